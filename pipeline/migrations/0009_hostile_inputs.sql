-- Hostile inputs and faults (issue 16).

-- Corpora as they come: what reading the corpus repaired or skipped during the scan's pass
-- (pipeline.corpus.CorpusStats; a resumed pass re-reads and recounts the corpus before its resume point).
ALTER TABLE scans ADD COLUMN corpus_documents BIGINT;      -- documents read
ALTER TABLE scans ADD COLUMN corpus_bad_lines BIGINT;      -- unparsable JSON lines (skipped)
ALTER TABLE scans ADD COLUMN corpus_no_text BIGINT;        -- documents without a string text field / column (skipped)
ALTER TABLE scans ADD COLUMN corpus_bad_bytes BIGINT;      -- invalid UTF-8 bytes (each replaced by U+FFFD)
ALTER TABLE scans ADD COLUMN corpus_cleaned_chars BIGINT;  -- control characters removed + lone surrogates replaced

-- Untrusted LLM text: an answer is capped at explain.max_answer_chars before it is cached;
-- answer_chars is the answer's length as received (> the cached text's length when it was cut).
ALTER TABLE llm_cache ADD COLUMN answer_chars BIGINT;

-- An answer is stored once, in llm_cache (explanations.prompt_hash = llm_cache.key); new rows
-- leave explanations.raw_text NULL.
ALTER TABLE explanations ALTER COLUMN raw_text DROP NOT NULL;
