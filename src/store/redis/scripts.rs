//! The Lua scripts under `lua/`, compiled in and loaded by name.

use fred::types::scripts::Script;

use super::super::StoreResult;
use super::call::Connection;

/// The scripts every handle of a store shares.
pub(super) struct Scripts {
    pub(super) task_write: Script,
    pub(super) task_clear: Script,
    pub(super) asset_write: Script,
    pub(super) asset_clear: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            task_write: Script::from_lua(include_str!("../../../lua/task_write.lua")),
            task_clear: Script::from_lua(include_str!("../../../lua/task_clear.lua")),
            asset_write: Script::from_lua(include_str!("../../../lua/asset_write.lua")),
            asset_clear: Script::from_lua(include_str!("../../../lua/asset_clear.lua")),
        }
    }

    /// Loads every script, so that a replica reports ready only once Redis has them.
    pub(super) async fn load(&self, redis: &Connection) -> StoreResult<()> {
        for script in [
            &self.task_write,
            &self.task_clear,
            &self.asset_write,
            &self.asset_clear,
        ] {
            redis
                .call("script_load", |pool| script.load(pool.next()))
                .await?;
        }
        Ok(())
    }
}
