//! The Lua scripts under `lua/`.

use fred::types::scripts::Script;

use super::super::events::EventHub;
use super::DEFAULT_EVENT_BUFFER;

/// Lua scripts, kept as files under `lua/` and compiled in, loaded by name; and the
/// change-event hub, which every handle of a store shares the same way.
pub(super) struct Scripts {
    pub(super) task_write: Script,
    pub(super) task_clear: Script,
    pub(super) asset_write: Script,
    pub(super) asset_clear: Script,
    pub(super) events: EventHub,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            task_write: Script::from_lua(include_str!("../../../lua/task_write.lua")),
            task_clear: Script::from_lua(include_str!("../../../lua/task_clear.lua")),
            asset_write: Script::from_lua(include_str!("../../../lua/asset_write.lua")),
            asset_clear: Script::from_lua(include_str!("../../../lua/asset_clear.lua")),
            events: EventHub::new(DEFAULT_EVENT_BUFFER),
        }
    }

    pub(super) fn all(&self) -> [&Script; 4] {
        [
            &self.task_write,
            &self.task_clear,
            &self.asset_write,
            &self.asset_clear,
        ]
    }
}
