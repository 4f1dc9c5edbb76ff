//! ABI evolution: a plugin built against the older, smaller table loads and works; one with an
//! incompatible table is refused (see `refusals::incompatible_function_table`).

use serde_json::json;
use tests::{PluginDir, fixture_build};

#[test]
fn older_table_still_loads_and_works() {
    let dir = PluginDir::new();
    let file = dir.add_file(&fixture_build("table-v1"), "libfixture_v1.so");
    let host = dir.host();
    let plugin = host.load(&file).unwrap();
    assert_eq!(plugin.name, "fixture");
    assert_eq!(plugin.table_version, 1);
    assert_eq!(
        host.execute("fixture", "table", &json!(null)),
        Some(json!(1))
    );
    assert_eq!(
        host.execute("fixture", "add", &json!({"n": 5})),
        Some(json!(5))
    );
    // Version 1 has no state functions: a reload works and the new generation starts fresh.
    let reloaded = host.reload("fixture").unwrap();
    assert!(reloaded.generation > plugin.generation);
    assert_eq!(
        host.execute("fixture", "total", &json!(null)),
        Some(json!(0))
    );
}

#[test]
fn current_table_version_is_reported() {
    let dir = PluginDir::new();
    let file = dir.add("fixture", "libfixture.so");
    let host = dir.host();
    assert_eq!(
        host.load(&file).unwrap().table_version,
        plugin_api::TABLE_VERSION
    );
    assert_eq!(
        host.execute("fixture", "table", &json!(null)),
        Some(json!(plugin_api::TABLE_VERSION))
    );
}
