//! The worker's hook points, declared once: the pipeline fires them through the handles below,
//! `worker hooks` and `GET /v1/hooks` list them (with the runtime's own `plugin.loaded` and
//! `plugin.unloaded`), and the README's table is checked against [`markdown_table`].

use plugin_host::{HookPoint, HookSpec, PayloadField, PluginHost, PluginHostBuilder};

/// A payload field, shorter to write.
const fn field(name: &'static str, description: &'static str) -> PayloadField {
    PayloadField { name, description }
}

const ID: PayloadField = field("id", "the task's id");
const TYPE: PayloadField = field("type", "the task's type");
const INPUT: PayloadField = field("input", "the task's input");
const META: PayloadField = field("meta", "free-form data for plugins");
const HANDLER: PayloadField = field("handler", "the handler chosen");
const VARIANT: PayloadField = field("variant", "the experiment's variant, or null");
const EXPERIMENT: PayloadField = field("experiment", "the experiment that applied, or null");
const CHOOSER: PayloadField = field(
    "chooser",
    "who chose the handler: `model-router`, `champion`, `bandit`, `experiment` (the variant names the handler), `task-policy` (it narrowed the handlers to this one), `default` (the type's first handler) or `task.before_handle` (a subscriber changed it)",
);
const ROLE: PayloadField = field(
    "role",
    "`champion` or `challenger` when the champion plugin routed the task, else null",
);
const LATENCY_MS: PayloadField = field("latency_ms", "time the handler took, in milliseconds");

/// The worker's hook points, in the order they are listed.
pub const HOOK_POINTS: &[HookSpec] = &[
    HookSpec {
        name: "worker.start",
        description: "the worker started (`run` or `serve`), after its plugins loaded",
        payload: &[field("plugins", "names of the loaded plugins")],
        writable: &[],
    },
    HookSpec {
        name: "worker.stop",
        description: "the worker is stopping, before its plugins unload",
        payload: &[field(
            "reason",
            "`tasks done` (`run`), or the signal that stopped `serve` (`SIGTERM`, `SIGINT`)",
        )],
        writable: &[],
    },
    HookSpec {
        name: "task.received",
        description: "a task arrived; a block skips it",
        payload: &[ID, TYPE, INPUT, META],
        writable: &["input", "meta"],
    },
    HookSpec {
        name: "task.before_handle",
        description: "a handler was chosen and is about to run",
        payload: &[ID, TYPE, HANDLER, VARIANT, EXPERIMENT, INPUT, META],
        writable: &["handler", "variant", "input", "meta"],
    },
    HookSpec {
        name: "task.after_step",
        description: "between two steps of a multi-step task; the next step sees the messages",
        payload: &[
            ID,
            TYPE,
            HANDLER,
            field("step", "the step just done, from 1"),
            field("messages", "the conversation so far: [{role, content}]"),
        ],
        writable: &["messages"],
    },
    HookSpec {
        name: "task.after_handle",
        description: "the handler finished",
        payload: &[
            ID,
            TYPE,
            HANDLER,
            VARIANT,
            field("output", "the handler's output"),
            LATENCY_MS,
        ],
        writable: &["output"],
    },
    HookSpec {
        name: "task.error",
        description: "a task failed or was blocked",
        payload: &[
            ID,
            TYPE,
            field(
                "error",
                "what went wrong (`blocked: ...` when a subscriber blocked it)",
            ),
            field(
                "handler",
                "the handler chosen, or null when the task failed before one was",
            ),
            field(
                "chooser",
                "who chose the handler (as in `task.scored`), or null",
            ),
            ROLE,
        ],
        writable: &[],
    },
    HookSpec {
        name: "task.scored",
        description: "a task was scored",
        payload: &[
            ID,
            TYPE,
            HANDLER,
            CHOOSER,
            VARIANT,
            EXPERIMENT,
            ROLE,
            field("score", "the score, 0 to 1"),
            LATENCY_MS,
            field("output_len", "the output's length in characters"),
            field(
                "plugins_ms",
                "milliseconds spent in each plugin asked: {plugin: ms}",
            ),
        ],
        writable: &[],
    },
];

/// The worker started.
pub const WORKER_START: HookPoint = HookPoint::declared(HOOK_POINTS, "worker.start");
/// The worker is stopping.
pub const WORKER_STOP: HookPoint = HookPoint::declared(HOOK_POINTS, "worker.stop");
/// A task arrived.
pub const TASK_RECEIVED: HookPoint = HookPoint::declared(HOOK_POINTS, "task.received");
/// A handler is about to run.
pub const TASK_BEFORE_HANDLE: HookPoint = HookPoint::declared(HOOK_POINTS, "task.before_handle");
/// Between two steps of a multi-step task.
pub const TASK_AFTER_STEP: HookPoint = HookPoint::declared(HOOK_POINTS, "task.after_step");
/// The handler finished.
pub const TASK_AFTER_HANDLE: HookPoint = HookPoint::declared(HOOK_POINTS, "task.after_handle");
/// A task failed or was blocked.
pub const TASK_ERROR: HookPoint = HookPoint::declared(HOOK_POINTS, "task.error");
/// A task was scored.
pub const TASK_SCORED: HookPoint = HookPoint::declared(HOOK_POINTS, "task.scored");

/// A host builder for the worker: the plugins in `plugins_dir`, with the worker's hook points.
pub fn host_builder(plugins_dir: impl Into<std::path::PathBuf>) -> PluginHostBuilder {
    PluginHost::builder(plugins_dir).with_hook_points(HOOK_POINTS)
}

/// Whether `host` was built with the worker's hook points (the pipeline's hooks fire only then).
pub fn has_worker_points(host: &PluginHost) -> bool {
    host.hook_point(HOOK_POINTS[0].name) == Some(WORKER_START)
}

/// The payload as `{a, b, c}`.
pub fn payload_summary(spec: &HookSpec) -> String {
    let names: Vec<&str> = spec.payload.iter().map(|f| f.name).collect();
    format!("{{{}}}", names.join(", "))
}

/// The README's table of hook points: every point (the worker's, then the runtime's) with when
/// it fires, its payload fields and its writable fields.
pub fn markdown_table() -> String {
    let mut table = String::from(
        "| hook point | fires when | payload | writable |\n| --- | --- | --- | --- |\n",
    );
    for spec in HOOK_POINTS.iter().chain(HookPoint::BUILT_IN) {
        let writable: String = spec.writable.iter().map(|w| format!(" `{w}`,")).collect();
        table.push_str(&format!(
            "| `{}` | {} | `{}` |{} |\n",
            spec.name,
            spec.description,
            payload_summary(spec),
            writable.trim_end_matches(',')
        ));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README documents the hook points; its table is this declaration's, word for word.
    #[test]
    fn the_readme_table_is_the_declaration() {
        let readme = include_str!("../../../README.md");
        let table = markdown_table();
        assert!(
            readme.contains(&table),
            "README.md's hook point table differs from the declaration in host/worker/src/hooks.rs; replace it with:\n\n{table}"
        );
    }

    #[test]
    fn every_handle_names_its_point() {
        let host = host_builder("no-such-dir").build().unwrap();
        assert!(has_worker_points(&host));
        for (handle, name) in [
            (WORKER_START, "worker.start"),
            (WORKER_STOP, "worker.stop"),
            (TASK_RECEIVED, "task.received"),
            (TASK_BEFORE_HANDLE, "task.before_handle"),
            (TASK_AFTER_STEP, "task.after_step"),
            (TASK_AFTER_HANDLE, "task.after_handle"),
            (TASK_ERROR, "task.error"),
            (TASK_SCORED, "task.scored"),
            (HookPoint::PLUGIN_LOADED, "plugin.loaded"),
            (HookPoint::PLUGIN_UNLOADED, "plugin.unloaded"),
        ] {
            assert_eq!(host.hook_spec(handle).map(|s| s.name), Some(name));
        }
        let listed: Vec<&str> = host.hook_points().iter().map(|p| p.name).collect();
        assert_eq!(listed.len(), HOOK_POINTS.len() + HookPoint::BUILT_IN.len());
        assert_eq!(listed[0], "worker.start");
        assert_eq!(listed[listed.len() - 1], "plugin.unloaded");
    }
}
