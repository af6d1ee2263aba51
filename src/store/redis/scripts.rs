//! The Lua scripts under `lua/`, compiled in and loaded by name, and what they take.

use fred::types::scripts::Script;

use super::super::StoreResult;
use super::call::Connection;

/// The text of `lua/<name>.lua`, compiled in.
macro_rules! lua {
    ($name:literal) => {
        include_str!(concat!("../../../lua/", $name, ".lua"))
    };
}

/// Functions the write scripts share (the If-Match / If-None-Match check), put in front
/// of each of them. Redis runs a script's text as one chunk and has no `require`.
const PRECONDITION: &str = lua!("precondition");

/// The scripts every handle of a store shares.
pub(super) struct Scripts {
    pub(super) task_write: Script,
    pub(super) task_clear: Script,
    pub(super) task_reclaim: Script,
    pub(super) asset_write: Script,
    pub(super) asset_clear: Script,
    pub(super) lifecycle_index: Script,
    pub(super) lease: Script,
    pub(super) bulk_read: Script,
    pub(super) task_read: Script,
    pub(super) export_batch: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            task_write: Script::from_lua([PRECONDITION, lua!("task_write")].concat()),
            task_clear: Script::from_lua(lua!("task_clear")),
            task_reclaim: Script::from_lua(lua!("task_reclaim")),
            asset_write: Script::from_lua([PRECONDITION, lua!("asset_write")].concat()),
            asset_clear: Script::from_lua(lua!("asset_clear")),
            lifecycle_index: Script::from_lua(lua!("lifecycle_index")),
            lease: Script::from_lua(lua!("lease")),
            bulk_read: Script::from_lua(lua!("bulk_read")),
            task_read: Script::from_lua(lua!("task_read")),
            export_batch: Script::from_lua(lua!("export_batch")),
        }
    }

    /// Loads every script, so that a replica reports ready only once Redis has them.
    pub(super) async fn load(&self, redis: &Connection) -> StoreResult<()> {
        for script in [
            &self.task_write,
            &self.task_clear,
            &self.task_reclaim,
            &self.asset_write,
            &self.asset_clear,
            &self.lifecycle_index,
            &self.lease,
            &self.bulk_read,
            &self.task_read,
            &self.export_batch,
        ] {
            redis
                .call("script_load", |pool| script.load(pool.next()))
                .await?;
        }
        Ok(())
    }
}

/// What a write script does to its key: ARGV[1] of `task_write.lua` and
/// `asset_write.lua`, which spell it as a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WriteOp {
    Set,
    Delete,
    /// Only reclaim expired keys (task scopes only).
    Purge,
}

impl WriteOp {
    pub(super) fn as_lua(self) -> &'static str {
        match self {
            WriteOp::Set => "set",
            WriteOp::Delete => "del",
            WriteOp::Purge => "purge",
        }
    }
}
