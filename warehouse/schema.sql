-- cxr-harvest warehouse schema, version 1. Applied by warehouse.db.connect(); readable with plain duckdb.
-- Coordinates: x, y, w, h in pixels, top-left origin, in the frame of the original image (images.width/height).
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, applied_at TIMESTAMP NOT NULL);

CREATE TABLE IF NOT EXISTS images (
    image_id      VARCHAR PRIMARY KEY,   -- NIH file name, or a pseudonymous id for DICOM
    patient_id    VARCHAR NOT NULL,      -- NIH patient id, or a pseudonym for DICOM
    follow_up     INTEGER,
    age           INTEGER,
    sex           VARCHAR,               -- 'M' | 'F' | NULL
    view          VARCHAR,               -- 'PA' | 'AP' | ...
    width         INTEGER NOT NULL,      -- of the original image
    height        INTEGER NOT NULL,
    spacing_x     DOUBLE,                -- mm per pixel
    spacing_y     DOUBLE,
    split         VARCHAR NOT NULL,      -- 'train' | 'val' | 'test'
    source        VARCHAR NOT NULL,      -- 'nih' | 'dicom' | 'phantom'
    source_sha256 VARCHAR,               -- NULL when ingested with --metadata-only
    ingested_at   TIMESTAMP NOT NULL
);

CREATE TABLE IF NOT EXISTS labels (
    image_id VARCHAR NOT NULL,
    finding  VARCHAR NOT NULL,           -- one of the 14 findings; 'No Finding' is the absence of rows
    PRIMARY KEY (image_id, finding)
);

CREATE TABLE IF NOT EXISTS gt_boxes (
    image_id VARCHAR NOT NULL,
    finding  VARCHAR NOT NULL,
    x DOUBLE NOT NULL, y DOUBLE NOT NULL, w DOUBLE NOT NULL, h DOUBLE NOT NULL,
    source   VARCHAR NOT NULL            -- 'bbox_list' | 'truth' (phantom) | 'review' (harvest import-review)
);

-- Images a person reviewed (harvest import-review): one row per image, its latest import. Its `review` rows in
-- gt_boxes are the boxes of that import; n_boxes = 0 is a reviewed negative.
CREATE TABLE IF NOT EXISTS reviews (
    image_id    VARCHAR PRIMARY KEY,
    file        VARCHAR NOT NULL,        -- the imported file (absolute path)
    file_sha256 VARCHAR NOT NULL,
    format      VARCHAR NOT NULL,        -- 'labelstudio' | 'coco'
    run_id      VARCHAR,                 -- the mining run whose boxes were reviewed, when known
    n_boxes     INTEGER NOT NULL,
    imported_at TIMESTAMP NOT NULL
);

-- Decode-once image cache: one row per (source file content, input size).
CREATE TABLE IF NOT EXISTS cache_entries (
    source_sha256 VARCHAR NOT NULL,
    size          INTEGER NOT NULL,      -- square side of the cached image
    shard         INTEGER NOT NULL,
    row           INTEGER NOT NULL,
    PRIMARY KEY (source_sha256, size)
);

-- crc32 of each cached image (its uint8 [size, size] bytes), written with its cache_entries row: `harvest check`
-- verifies every row and mining every image it reads. Rows cached before this table existed have none (unknown).
CREATE TABLE IF NOT EXISTS cache_checksums (
    source_sha256 VARCHAR NOT NULL,
    size          INTEGER NOT NULL,
    crc32         UBIGINT NOT NULL,
    PRIMARY KEY (source_sha256, size)
);

CREATE TABLE IF NOT EXISTS models (
    model_id          VARCHAR PRIMARY KEY,
    parent_id         VARCHAR,
    stage             VARCHAR NOT NULL,
    arch              VARCHAR NOT NULL,
    neck              VARCHAR NOT NULL,
    config            JSON,
    checkpoint        VARCHAR NOT NULL,  -- path relative to the home folder
    checkpoint_sha256 VARCHAR NOT NULL,
    metrics           JSON,
    created_at        TIMESTAMP NOT NULL
);

CREATE TABLE IF NOT EXISTS runs (
    run_id       VARCHAR PRIMARY KEY,
    flow         VARCHAR NOT NULL,
    params       JSON,
    model_id     VARCHAR,
    code_version VARCHAR,
    started_at   TIMESTAMP NOT NULL,
    finished_at  TIMESTAMP,
    status       VARCHAR NOT NULL        -- 'running' | 'completed' | 'failed' | 'killed' (its process died)
);

-- The process that runs each run: a `running` run whose process is gone (same host, pid dead or reused) is
-- marked 'killed' by the next writer (pipeline.runs.record.writer calls mark_killed_runs).
CREATE TABLE IF NOT EXISTS run_owners (
    run_id      VARCHAR PRIMARY KEY,
    host        VARCHAR NOT NULL,
    pid         INTEGER NOT NULL,
    pid_started DOUBLE                   -- the process's start time, epoch seconds (tells a reused pid)
);

CREATE TABLE IF NOT EXISTS eval_results (
    run_id    VARCHAR NOT NULL,
    protocol  VARCHAR NOT NULL,          -- e.g. 'bounded/iou', 'all/iobb'; tuned on evaluation boxes -> contains 'oracle'
    metric    VARCHAR NOT NULL,          -- 'acc', 'maxboxacc', ...
    finding   VARCHAR NOT NULL,
    t         DOUBLE NOT NULL,
    acc       DOUBLE,
    afp       DOUBLE,
    n_gt      INTEGER,
    n_images  INTEGER
);

CREATE TABLE IF NOT EXISTS rejects (
    stage  VARCHAR NOT NULL,             -- 'ingest.nih', 'ingest.dicom', 'cache', ...
    source VARCHAR NOT NULL,             -- dataset root or file it came from
    path   VARCHAR,                      -- offending file or CSV row, relative to the source
    reason VARCHAR NOT NULL,             -- short machine-groupable cause
    detail VARCHAR,                      -- human sentence naming the cause and the fix
    "at"   TIMESTAMP NOT NULL
);

-- Trust in a mining run's boxes per finding, measured on its tuning set, never on evaluation boxes
-- (pipeline.evaluation.trust; `harvest tune --run`): `harvest export` keeps the `kept` findings, their boxes of
-- `rank` with score >= min_score, unless told `--all`.
CREATE TABLE IF NOT EXISTS trust (
    run_id     VARCHAR NOT NULL,
    finding    VARCHAR NOT NULL,
    source     VARCHAR NOT NULL,         -- the tuning set: 'truth@val' (phantom truth, validation images) | 'review'
    t          DOUBLE NOT NULL,          -- T(IoU)
    n_gt       INTEGER NOT NULL,         -- truth boxes of the finding in the tuning set (0: no estimate)
    n_images   INTEGER NOT NULL,
    rank       INTEGER,                  -- the box rank exported (ranks order the sec. 3.2 threshold levels' boxes)
    min_score  DOUBLE,                   -- boxes of that rank below it are left out (NULL: none)
    acc        DOUBLE,                   -- estimated Acc@t of the kept boxes (rule cross-fitted)
    lo         DOUBLE,                   -- its 95 % bootstrap interval over images
    hi         DOUBLE,
    precision  DOUBLE,                   -- share of kept boxes that hit a truth box
    floor      DOUBLE NOT NULL,          -- the Acc a finding needs to be kept
    kept       BOOLEAN NOT NULL,
    basis      VARCHAR NOT NULL,         -- the box counts it was measured on: measured again when they change
    created_at TIMESTAMP NOT NULL,
    PRIMARY KEY (run_id, finding)
);

-- Images read from an archive of NIH's download (`images_001.tar.gz` ...) rather than a file: one row per image,
-- the archive's path relative to the ingest root and the member inside it. Exports and `harvest check --repair`
-- read the member from there; an image ingested from a file has no row. Added after version 1 (no change to
-- `images`): an older home gets the empty table on its next connection.
CREATE TABLE IF NOT EXISTS image_archives (
    image_id VARCHAR PRIMARY KEY,
    archive  VARCHAR NOT NULL,           -- e.g. 'images_001.tar.gz'
    member   VARCHAR NOT NULL            -- e.g. 'images/00000001_000.png'
);
