-- Batched EPO and objective scales (issues 10, 17, 11).
-- objective_scale: what EPO divided f by so that λ means the same for every objective
--   ('z' = σ over random prompts, 'dataset_max', 'raw'); scale: its value in the objective's units.
-- batch_jobs: how many (target, seed) populations shared the batched search (wall_s is this job's share).
ALTER TABLE dream_runs ADD COLUMN objective_scale VARCHAR;
ALTER TABLE dream_runs ADD COLUMN scale DOUBLE;
ALTER TABLE dream_runs ADD COLUMN batch_jobs INTEGER;
-- CE without the first optimized token (nats/token; the reference code's convention).
ALTER TABLE dream_prompts ADD COLUMN ce_rest DOUBLE;
