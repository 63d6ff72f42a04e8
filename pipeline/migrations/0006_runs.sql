-- Runs that tell the truth (issue 11): why a run failed or was interrupted, and the key of the
-- inputs its report was last rendered from (a resumed run whose inputs did not change keeps its
-- report). runs.status: 'running' | 'done' | 'failed' | 'interrupted'; runs.wall_s accumulates
-- over resumes.
ALTER TABLE runs ADD COLUMN error VARCHAR;
ALTER TABLE runs ADD COLUMN report_key VARCHAR;
