-- index idx__sqlite_migrations_migration_set_name
CREATE UNIQUE INDEX "idx__sqlite_migrations_migration_set_name"
    ON "_sqlite_migrations" ("migration_set", "name");
-- index idx_api_keys_key_hash
CREATE UNIQUE INDEX "idx_api_keys_key_hash"
    ON "api_keys" ("key_hash");
-- index idx_corrections_turn_id
CREATE INDEX "idx_corrections_turn_id"
    ON "corrections" ("turn_id");
-- index idx_erasures_created_at
CREATE INDEX "idx_erasures_created_at"
    ON "erasures" ("created_at");
-- index idx_eval_reports_adapter
CREATE INDEX "idx_eval_reports_adapter"
    ON "eval_reports" ("adapter");
-- index idx_examples_content_hash
CREATE UNIQUE INDEX "idx_examples_content_hash"
    ON "examples" ("content_hash");
-- index idx_examples_question_hash
CREATE INDEX "idx_examples_question_hash"
    ON "examples" ("question_hash");
-- index idx_examples_split
CREATE INDEX "idx_examples_split"
    ON "examples" ("split");
-- index idx_gate_decisions_candidate
CREATE INDEX "idx_gate_decisions_candidate"
    ON "gate_decisions" ("candidate");
-- index idx_knowledge_source_id
CREATE UNIQUE INDEX "idx_knowledge_source_id"
    ON "knowledge" ("source_id");
-- index idx_retrain_runs_status
CREATE INDEX "idx_retrain_runs_status"
    ON "retrain_runs" ("status");
-- index idx_review_actions_turn_id_staff_user
CREATE INDEX "idx_review_actions_turn_id_staff_user"
    ON "review_actions" ("turn_id", "staff_user");
-- index idx_review_marks_pair_id_side_staff_user
CREATE UNIQUE INDEX "idx_review_marks_pair_id_side_staff_user"
    ON "review_marks" ("pair_id", "side", "staff_user");
-- index idx_review_pairs_batch
CREATE INDEX "idx_review_pairs_batch"
    ON "review_pairs" ("batch");
-- index idx_sessions_address_created_at
CREATE INDEX "idx_sessions_address_created_at"
    ON "sessions" ("address", "created_at");
-- index idx_sessions_api_key
CREATE INDEX "idx_sessions_api_key"
    ON "sessions" ("api_key");
-- index idx_signin_attempts_address_created_at
CREATE INDEX "idx_signin_attempts_address_created_at"
    ON "signin_attempts" ("address", "created_at");
-- index idx_signin_attempts_created_at
CREATE INDEX "idx_signin_attempts_created_at"
    ON "signin_attempts" ("created_at");
-- index idx_signin_attempts_name_created_at
CREATE INDEX "idx_signin_attempts_name_created_at"
    ON "signin_attempts" ("name", "created_at");
-- index idx_staff_sessions_expires_at
CREATE INDEX "idx_staff_sessions_expires_at"
    ON "staff_sessions" ("expires_at");
-- index idx_staff_sessions_name
CREATE INDEX "idx_staff_sessions_name"
    ON "staff_sessions" ("name");
-- index idx_turns_created_at
CREATE INDEX "idx_turns_created_at"
    ON "turns" ("created_at");
-- index idx_turns_session_id
CREATE INDEX "idx_turns_session_id"
    ON "turns" ("session_id");
-- index idx_votes_created_at
CREATE INDEX "idx_votes_created_at"
    ON "votes" ("created_at");
-- index idx_votes_turn_id_session_id
CREATE INDEX "idx_votes_turn_id_session_id"
    ON "votes" ("turn_id", "session_id");
-- table _sqlite_migrations
CREATE TABLE "_sqlite_migrations" (
   "id" INTEGER PRIMARY KEY,
   "migration_set" TEXT,
   "name" TEXT,
   "applied_at" TEXT
);
-- table api_keys
CREATE TABLE "api_keys" (
   "name" TEXT PRIMARY KEY,
   "key_hash" TEXT NOT NULL,
   "per_minute" INTEGER NOT NULL,
   "created_at" TEXT NOT NULL,
   "revoked_at" TEXT,
   "last_used_at" TEXT
, "test" INTEGER NOT NULL DEFAULT 0);
-- table corrections
CREATE TABLE "corrections" (
   "id" INTEGER PRIMARY KEY,
   "turn_id" INTEGER REFERENCES "turns"("id"),
   "kind" TEXT NOT NULL,
   "question" TEXT NOT NULL,
   "answer" TEXT NOT NULL,
   "label" TEXT,
   "staff_user" TEXT NOT NULL REFERENCES "staff_users"("name"),
   "created_at" TEXT NOT NULL
);
-- table dataset_versions
CREATE TABLE "dataset_versions" (
   "version" TEXT PRIMARY KEY,
   "path" TEXT NOT NULL,
   "manifest_sha256" TEXT NOT NULL,
   "train" INTEGER,
   "val" INTEGER,
   "test" INTEGER,
   "created_at" TEXT NOT NULL
);
-- table embeddings
CREATE TABLE "embeddings" (
   "hash" TEXT,
   "model" TEXT,
   "vector" BLOB NOT NULL,
   PRIMARY KEY ("hash", "model")
);
-- table erasures
CREATE TABLE "erasures" (
   "id" INTEGER PRIMARY KEY,
   "kind" TEXT NOT NULL,
   "target" TEXT,
   "turn_ids" TEXT NOT NULL,
   "row_ids" TEXT NOT NULL,
   "snapshots" TEXT NOT NULL,
   "erased_by" TEXT,
   "created_at" TEXT NOT NULL
);
-- table eval_reports
CREATE TABLE "eval_reports" (
   "id" INTEGER PRIMARY KEY,
   "run_id" INTEGER REFERENCES "retrain_runs"("id"),
   "role" TEXT NOT NULL,
   "adapter" TEXT,
   "dataset" TEXT NOT NULL,
   "n" INTEGER NOT NULL,
   "f1" REAL NOT NULL,
   "label_f1" REAL,
   "answer_f1" REAL,
   "rouge_l" REAL,
   "bleu" REAL,
   "latency_s" REAL,
   "tokens_per_answer" REAL,
   "prompt_tokens" REAL,
   "perplexity" REAL,
   "report" TEXT NOT NULL,
   "created_at" TEXT NOT NULL
);
-- table examples
CREATE TABLE "examples" (
   "id" INTEGER PRIMARY KEY,
   "content_hash" TEXT NOT NULL,
   "question_hash" TEXT NOT NULL,
   "question" TEXT NOT NULL,
   "answer" TEXT NOT NULL,
   "label" TEXT,
   "source" TEXT NOT NULL,
   "split" TEXT NOT NULL,
   "origin" TEXT,
   "created_at" TEXT NOT NULL
);
-- table gate_decisions
CREATE TABLE "gate_decisions" (
   "id" INTEGER PRIMARY KEY,
   "run_id" INTEGER REFERENCES "retrain_runs"("id"),
   "candidate" TEXT NOT NULL,
   "incumbent" TEXT,
   "promote" INTEGER NOT NULL,
   "reasons" TEXT NOT NULL,
   "metrics" TEXT NOT NULL,
   "config" TEXT,
   "created_at" TEXT NOT NULL
);
-- table knowledge
CREATE TABLE "knowledge" (
           "id" INTEGER PRIMARY KEY AUTOINCREMENT,
           "source" TEXT NOT NULL,
           "source_id" TEXT NOT NULL,
           "question" TEXT NOT NULL,
           "answer" TEXT NOT NULL,
           "label" TEXT,
           "vector" BLOB NOT NULL,
           "created_at" TEXT NOT NULL,
           "removed_at" TEXT
        );
-- table retrain_runs
CREATE TABLE "retrain_runs" (
   "id" INTEGER PRIMARY KEY,
   "status" TEXT NOT NULL,
   "stage" TEXT NOT NULL,
   "pid" INTEGER NOT NULL,
   "started_at" TEXT NOT NULL,
   "finished_at" TEXT,
   "dataset" TEXT,
   "dataset_sha256" TEXT,
   "candidate" TEXT,
   "incumbent" TEXT,
   "promoted" INTEGER DEFAULT 0,
   "reasons" TEXT,
   "f1" TEXT,
   "error" TEXT,
   "seconds" REAL,
   "config" TEXT
);
-- table review_actions
CREATE TABLE "review_actions" (
   "id" INTEGER PRIMARY KEY,
   "turn_id" INTEGER NOT NULL REFERENCES "turns"("id"),
   "action" TEXT NOT NULL,
   "correction_id" INTEGER,
   "staff_user" TEXT NOT NULL,
   "created_at" TEXT NOT NULL,
   "undone_by" TEXT,
   "undone_at" TEXT
);
-- table review_marks
CREATE TABLE "review_marks" (
   "id" INTEGER PRIMARY KEY,
   "pair_id" INTEGER NOT NULL REFERENCES "review_pairs"("id"),
   "side" TEXT NOT NULL,
   "staff_user" TEXT NOT NULL,
   "helpful" INTEGER NOT NULL,
   "created_at" TEXT NOT NULL
);
-- table review_pairs
CREATE TABLE "review_pairs" (
   "id" INTEGER PRIMARY KEY,
   "batch" TEXT NOT NULL,
   "question" TEXT NOT NULL,
   "reference" TEXT,
   "left_adapter" TEXT,
   "left_answer" TEXT NOT NULL,
   "right_adapter" TEXT,
   "right_answer" TEXT NOT NULL,
   "created_at" TEXT NOT NULL
);
-- table sessions
CREATE TABLE "sessions" (
   "id" TEXT PRIMARY KEY,
   "kind" TEXT NOT NULL,
   "created_at" TEXT NOT NULL
, "address" TEXT, "api_key" TEXT);
-- table signin_attempts
CREATE TABLE "signin_attempts" (
   "id" INTEGER PRIMARY KEY,
   "name" TEXT NOT NULL,
   "ok" INTEGER NOT NULL,
   "created_at" TEXT NOT NULL
, "address" TEXT);
-- table staff_sessions
CREATE TABLE "staff_sessions" (
   "token_hash" TEXT PRIMARY KEY,
   "name" TEXT NOT NULL REFERENCES "staff_users"("name"),
   "address" TEXT,
   "created_at" TEXT NOT NULL,
   "expires_at" TEXT NOT NULL
);
-- table staff_users
CREATE TABLE "staff_users" (
   "name" TEXT PRIMARY KEY,
   "password_hash" TEXT NOT NULL,
   "created_at" TEXT NOT NULL,
   "disabled" INTEGER DEFAULT 0
);
-- table turns
CREATE TABLE "turns" (
   "id" INTEGER PRIMARY KEY,
   "session_id" TEXT NOT NULL REFERENCES "sessions"("id"),
   "question" TEXT NOT NULL,
   "answer" TEXT,
   "history" TEXT,
   "adapter" TEXT,
   "base_model" TEXT,
   "status" TEXT NOT NULL,
   "error" TEXT,
   "latency_s" REAL,
   "first_token_s" REAL,
   "tokens_in" INTEGER,
   "tokens_out" INTEGER,
   "created_at" TEXT NOT NULL,
   "finished_at" TEXT
, "sources" TEXT);
-- table votes
CREATE TABLE "votes" (
   "id" INTEGER PRIMARY KEY,
   "turn_id" INTEGER NOT NULL REFERENCES "turns"("id"),
   "session_id" TEXT NOT NULL REFERENCES "sessions"("id"),
   "value" INTEGER NOT NULL,
   "reason" TEXT,
   "flagged" INTEGER DEFAULT 0,
   "created_at" TEXT NOT NULL
);
