-- Active compute allocation (issue 15 §3): the extra EPO seeds a nightly planned inside run.budget_s,
-- why (lost to the dataset / still improving), and whether each ran ('done'), found no time
-- ('budget') or was not needed ('skipped': converged; seed NULL).
CREATE TABLE extra_seeds (
    run_id      VARCHAR NOT NULL,
    target_id   VARCHAR NOT NULL,
    seed        INTEGER,
    status      VARCHAR NOT NULL,
    reason      VARCHAR NOT NULL,
    priority    DOUBLE,
    wall_s      DOUBLE,
    created_at  TIMESTAMP NOT NULL
);
