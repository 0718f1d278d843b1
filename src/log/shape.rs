//! The shape of a data directory: how many shards it has and how queues map to them,
//! recorded when the directory is created. Every queue's data lives on one shard, so opening
//! a directory with another shape would lose queues; such a start is refused, never re-sharded.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::fsutil::{parent_or_cwd, sync_dir, write_atomically};

/// Name of the shape file inside a data directory.
pub const SHAPE_FILE: &str = "shape.properties";
/// Version of the shape file this code writes and reads.
pub const SHAPE_FORMAT: u32 = 1;
/// Most shards a data directory may have: one per core, with room for large machines.
pub const MAX_SHARDS: u32 = 4096;
/// Largest shape file read; the real one is under 200 bytes.
pub const MAX_SHAPE_FILE_LEN: u64 = 64 * 1024;

/// How a queue is assigned to a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueMap {
    /// `shard = (crc32c(topic bytes) + queue_id) % shards`: the queues of one topic land on
    /// consecutive shards, so a topic with at least `shards` queues uses every core. A
    /// consumer group's retry and dead-letter topics (`%RETRY%<group>`, `%DLQ%<group>`) hash
    /// the group name instead, so both live on one shard: the shard that takes a send-back
    /// can store a dead letter itself. (Those topics did not exist before this rule, so no
    /// data directory holds one placed by the plain rule.)
    TopicHashPlusQueue,
}

impl QueueMap {
    /// The `queue_map` value in the shape file.
    pub fn name(self) -> &'static str {
        match self {
            Self::TopicHashPlusQueue => "topic-crc32c-plus-queue-mod-shards",
        }
    }

    /// Parses a `queue_map` value.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::TopicHashPlusQueue]
            .into_iter()
            .find(|m| m.name() == name)
    }

    /// The shard, of `shards`, that owns `topic`'s queue `queue_id`.
    pub fn shard_of(self, shards: u32, topic: &str, queue_id: u32) -> u32 {
        assert!(shards > 0, "a shape has at least one shard");
        match self {
            Self::TopicHashPlusQueue => {
                let hashed = orbitmq_proto::sys::group_of(topic).unwrap_or(topic);
                // u64 sum: crc + queue id cannot overflow, and the result is < shards.
                ((u64::from(crc32c::crc32c(hashed.as_bytes())) + u64::from(queue_id))
                    % u64::from(shards)) as u32
            }
        }
    }
}

/// The recorded shape of a data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub shards: u32,
    pub map: QueueMap,
}

impl Shape {
    /// The shard that owns `topic`'s queue `queue_id`.
    pub fn shard_of(&self, topic: &str, queue_id: u32) -> u32 {
        self.map.shard_of(self.shards, topic, queue_id)
    }

    /// The shape file's contents.
    pub fn encode(&self) -> String {
        format!(
            "# orbitmq data directory shape, written once at creation; do not edit.\n\
             format={SHAPE_FORMAT}\nshards={}\nqueue_map={}\n",
            self.shards,
            self.map.name()
        )
    }

    /// Parses a shape file's contents; `path` names the file in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ShapeError> {
        let invalid = |line: usize, reason: String| ShapeError::Invalid {
            path: path.to_owned(),
            line,
            reason,
        };
        let (mut format, mut shards, mut map) = (None, None, None);
        let mut last_line = 0;
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            last_line = n;
            let line = raw.trim();
            // Blank lines and comments, as in Java properties files.
            if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(invalid(n, format!("{line:?} is not key=value")));
            };
            let (key, value) = (key.trim(), value.trim());
            let slot = match key {
                "format" => &mut format,
                "shards" => &mut shards,
                "queue_map" => &mut map,
                _ => return Err(invalid(n, format!("unknown key {key:?}"))),
            };
            if slot.replace((n, value)).is_some() {
                return Err(invalid(n, format!("{key} is set twice")));
            }
        }
        let missing = |key: &str| invalid(last_line, format!("{key} is missing"));

        let (n, format) = format.ok_or_else(|| missing("format"))?;
        if format.parse::<u32>().ok() != Some(SHAPE_FORMAT) {
            return Err(invalid(
                n,
                format!(
                    "format {format:?} is not supported (this orbitmq reads format \
                     {SHAPE_FORMAT}); was the directory written by a newer orbitmq?"
                ),
            ));
        }
        let (n, shards_text) = shards.ok_or_else(|| missing("shards"))?;
        let shards = shards_text
            .parse::<u32>()
            .ok()
            .filter(|s| (1..=MAX_SHARDS).contains(s))
            .ok_or_else(|| {
                invalid(
                    n,
                    format!("shards {shards_text:?} is not a number in 1..={MAX_SHARDS}"),
                )
            })?;
        let (n, map_name) = map.ok_or_else(|| missing("queue_map"))?;
        let map = QueueMap::from_name(map_name).ok_or_else(|| {
            invalid(
                n,
                format!(
                    "queue_map {map_name:?} is unknown (known: {})",
                    QueueMap::TopicHashPlusQueue.name()
                ),
            )
        })?;
        Ok(Self { shards, map })
    }
}

/// Why a data directory's shape could not be opened or created.
#[derive(Debug, Error)]
pub enum ShapeError {
    #[error("the number of shards must be 1..={MAX_SHARDS}, got {requested}")]
    BadShardCount { requested: u32 },
    #[error(
        "data directory {dir} was created with {recorded} shards, but {requested} were \
         requested; start with `--shards {recorded}` or use a new data directory \
         (orbitmq never re-shards a data directory)"
    )]
    Mismatch {
        dir: PathBuf,
        recorded: u32,
        requested: u32,
    },
    #[error("shape file {path}, line {line}: {reason}")]
    Invalid {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("shape file {path} is {len} bytes, over the limit of {MAX_SHAPE_FILE_LEN}")]
    TooLarge { path: PathBuf, len: u64 },
    #[error("shape of data directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The shape recorded in `dir`, if the directory has one.
pub fn read(dir: &Path) -> Result<Option<Shape>, ShapeError> {
    let path = dir.join(SHAPE_FILE);
    let io_err = |source| ShapeError::Io {
        path: path.clone(),
        source,
    };
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    let len = file.metadata().map_err(io_err)?.len();
    if len > MAX_SHAPE_FILE_LEN {
        return Err(ShapeError::TooLarge { path, len });
    }
    let mut bytes = Vec::new();
    file.take(MAX_SHAPE_FILE_LEN)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        ShapeError::Invalid {
            path: path.clone(),
            line: valid.iter().filter(|&&c| c == b'\n').count() + 1,
            reason: "not UTF-8".to_owned(),
        }
    })?;
    Shape::parse(&path, &text).map(Some)
}

/// Opens the shape recorded in `dir`, or records one with `requested_shards` if the directory
/// has none yet. A recorded shard count different from `requested_shards` is refused.
pub fn open_or_create(dir: &Path, requested_shards: u32) -> Result<Shape, ShapeError> {
    if !(1..=MAX_SHARDS).contains(&requested_shards) {
        return Err(ShapeError::BadShardCount {
            requested: requested_shards,
        });
    }
    if let Some(shape) = read(dir)? {
        if shape.shards != requested_shards {
            return Err(ShapeError::Mismatch {
                dir: dir.to_owned(),
                recorded: shape.shards,
                requested: requested_shards,
            });
        }
        tracing::debug!(dir = %dir.display(), shards = shape.shards, "opened data directory shape");
        return Ok(shape);
    }
    let path = dir.join(SHAPE_FILE);
    let shape = Shape {
        shards: requested_shards,
        map: QueueMap::TopicHashPlusQueue,
    };
    create_dir_durably(dir).map_err(|source| ShapeError::Io {
        path: dir.to_owned(),
        source,
    })?;
    write_atomically(&path, shape.encode().as_bytes())
        .map_err(|source| ShapeError::Io { path, source })?;
    tracing::info!(
        dir = %dir.display(), shards = shape.shards, queue_map = shape.map.name(),
        "recorded the shape of a new data directory"
    );
    Ok(shape)
}

/// Creates `dir` and its missing parents, making each new entry durable in its parent.
fn create_dir_durably(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_durably(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        // Another process made it meanwhile: its entry is durable once we sync the parent.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    sync_dir(parent_or_cwd(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_then_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data").join("shard-root");
        let created = open_or_create(&dir, 4).unwrap();
        assert_eq!(created.shards, 4);
        assert_eq!(created.map, QueueMap::TopicHashPlusQueue);
        assert!(dir.join(SHAPE_FILE).is_file());
        assert!(!dir.join("shape.properties.tmp").exists());
        let text = fs::read_to_string(dir.join(SHAPE_FILE)).unwrap();
        assert!(text.contains("format=1\n"), "{text}");
        assert!(text.contains("shards=4\n"), "{text}");
        assert!(
            text.contains("queue_map=topic-crc32c-plus-queue-mod-shards\n"),
            "{text}"
        );
        assert_eq!(open_or_create(&dir, 4).unwrap(), created);
    }

    #[test]
    fn mismatch_names_both_counts() {
        let tmp = tempfile::tempdir().unwrap();
        open_or_create(tmp.path(), 8).unwrap();
        let err = open_or_create(tmp.path(), 2).unwrap_err();
        assert!(
            matches!(
                err,
                ShapeError::Mismatch {
                    recorded: 8,
                    requested: 2,
                    ..
                }
            ),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains("created with 8 shards"), "{msg}");
        assert!(msg.contains("2 were requested"), "{msg}");
        assert!(msg.contains("--shards 8"), "{msg}");
        assert!(msg.contains("new data directory"), "{msg}");
        assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
        // The refused start left the recorded shape alone.
        assert_eq!(open_or_create(tmp.path(), 8).unwrap().shards, 8);
    }

    #[test]
    fn bad_shard_counts() {
        let tmp = tempfile::tempdir().unwrap();
        for bad in [0, MAX_SHARDS + 1] {
            let err = open_or_create(tmp.path(), bad).unwrap_err();
            assert!(matches!(err, ShapeError::BadShardCount { .. }), "{err}");
        }
        assert!(!tmp.path().join(SHAPE_FILE).exists());
    }

    #[test]
    fn map_is_deterministic_and_spreads() {
        let shape = Shape {
            shards: 2,
            map: QueueMap::TopicHashPlusQueue,
        };
        let mut per_shard = [0; 2];
        for q in 0..8 {
            let s = shape.shard_of("TopicTest", q);
            assert_eq!(s, shape.shard_of("TopicTest", q));
            per_shard[s as usize] += 1;
        }
        assert_eq!(per_shard, [4, 4]);
        // Pinned to CRC-32C (Castagnoli): its check value for "123456789" is 0xE3069283.
        let seven = Shape {
            shards: 7,
            map: QueueMap::TopicHashPlusQueue,
        };
        assert_eq!(seven.shard_of("123456789", 0), (0xE306_9283u64 % 7) as u32);
        assert_eq!(
            seven.shard_of("123456789", 5),
            ((0xE306_9283u64 + 5) % 7) as u32
        );
        let one = Shape {
            shards: 1,
            map: QueueMap::TopicHashPlusQueue,
        };
        assert_eq!(one.shard_of("x", u32::MAX), 0);
    }

    #[test]
    fn retry_and_dlq_of_a_group_share_a_shard() {
        for shards in [2, 3, 7, 64] {
            let shape = Shape {
                shards,
                map: QueueMap::TopicHashPlusQueue,
            };
            for g in ["g", "orders-consumer", "G_1", "%odd"] {
                let retry = shape.shard_of(&format!("%RETRY%{g}"), 0);
                assert_eq!(retry, shape.shard_of(&format!("%DLQ%{g}"), 0), "{g}");
                assert_eq!(
                    retry,
                    (u64::from(crc32c::crc32c(g.as_bytes())) % u64::from(shards)) as u32
                );
            }
        }
        // Other topics keep the plain rule (existing data directories are unaffected).
        let seven = Shape {
            shards: 7,
            map: QueueMap::TopicHashPlusQueue,
        };
        assert_eq!(seven.shard_of("123456789", 0), (0xE306_9283u64 % 7) as u32);
        assert_eq!(
            seven.shard_of("%RETRY%123456789", 1),
            ((0xE306_9283u64 + 1) % 7) as u32
        );
    }

    #[test]
    fn corrupt_file_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(SHAPE_FILE);
        let cases = [
            ("format=1\nshards=4\n", "queue_map is missing"),
            (
                "format=2\nshards=4\nqueue_map=topic-crc32c-plus-queue-mod-shards\n",
                "format \"2\"",
            ),
            (
                "format=1\nshards=x\nqueue_map=topic-crc32c-plus-queue-mod-shards\n",
                "shards \"x\"",
            ),
            (
                "format=1\nshards=0\nqueue_map=topic-crc32c-plus-queue-mod-shards\n",
                "shards \"0\"",
            ),
            (
                "format=1\nshards=4\nqueue_map=round-robin\n",
                "queue_map \"round-robin\"",
            ),
            ("format=1\nshards=4\nshards=4\n", "set twice"),
            ("format=1\ncolor=blue\n", "unknown key \"color\""),
            ("format=1\nshards 4\n", "not key=value"),
            ("", "format is missing"),
        ];
        for (text, expected) in cases {
            fs::write(&path, text).unwrap();
            let err = open_or_create(tmp.path(), 4).unwrap_err();
            assert!(matches!(err, ShapeError::Invalid { .. }), "{text:?}: {err}");
            let msg = err.to_string();
            assert!(msg.contains(expected), "{text:?}: {msg}");
            assert!(msg.contains(SHAPE_FILE), "{msg}");
        }
        fs::write(&path, b"format=1\n\xff\n").unwrap();
        assert!(matches!(
            open_or_create(tmp.path(), 4),
            Err(ShapeError::Invalid { line: 2, .. })
        ));
    }

    #[test]
    fn hand_written_file_with_comments_and_spaces() {
        let text =
            "# note\n\n format = 1 \nshards= 3\nqueue_map =topic-crc32c-plus-queue-mod-shards\n";
        let shape = Shape::parse(Path::new(SHAPE_FILE), text).unwrap();
        assert_eq!(shape.shards, 3);
        assert_eq!(
            Shape::parse(Path::new(SHAPE_FILE), &shape.encode()).unwrap(),
            shape
        );
    }
}
