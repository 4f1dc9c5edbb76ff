//! The ABI check of a plugin's function table, and abi_stable's report of a mismatch summarized
//! to what differs. Safe code: the layouts are `'static` data the header check has already
//! validated.

use std::fmt::Write as _;

use abi_stable::StableAbi;
use abi_stable::abi_stability::abi_checking::{
    CheckingGlobals, check_layout_compatibility_with_globals,
};
use abi_stable::type_layout::TypeLayout;
use plugin_api::abi::PluginTableRef;

use crate::error::LoadErrorKind;

/// Checks the plugin's table layout against the host's.
///
/// abi_stable accepts an implementation with *more* prefix-type fields than the interface. A
/// plugin built against a newer plugin-api passes that way round; one built against an older
/// plugin-api (fewer fields: capabilities it predates) passes the other way round, and its
/// missing fields read as `None` through the prefix accessors. Anything else is refused.
pub(crate) fn check_table_layout(plugin: &'static TypeLayout) -> Result<(), LoadErrorKind> {
    let host = <PluginTableRef as StableAbi>::LAYOUT;
    // A fresh `CheckingGlobals` per check: abi_stable's process-wide one would keep pointers
    // into this library after it is closed.
    let newer_or_same =
        check_layout_compatibility_with_globals(host, plugin, &CheckingGlobals::new());
    let Err(errors) = newer_or_same else {
        return Ok(());
    };
    if check_layout_compatibility_with_globals(plugin, host, &CheckingGlobals::new()).is_ok() {
        return Ok(());
    }
    // Formatted now, into owned text: the errors borrow the plugin's layouts.
    let mut full = String::new();
    for error in &errors.errors {
        let _ = write!(full, "{error}");
    }
    Err(LoadErrorKind::LayoutMismatch {
        details: summarize_layout_errors(&full),
    })
}

/// abi_stable's report prints both complete layouts; keep what differs: each `Error:` with its
/// expected and found values, and the last field named before it.
fn summarize_layout_errors(full: &str) -> String {
    let lines: Vec<&str> = full.lines().map(str::trim).collect();
    let mut summary: Vec<String> = Vec::new();
    let mut field = None;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        i += 1;
        if let Some(name) = line.strip_prefix("field_name:") {
            field = Some(name);
            continue;
        }
        let Some(what) = line.strip_prefix("Error:") else {
            continue;
        };
        let mut expected = Vec::new();
        let mut found = Vec::new();
        let mut into: Option<&mut Vec<&str>> = None;
        while i < lines.len() {
            match lines[i] {
                "Expected:" => into = Some(&mut expected),
                "Found:" => into = Some(&mut found),
                l if l.is_empty() || l.ends_with("error(s)inside:") || l.starts_with("Error:") => {
                    break;
                }
                l => {
                    if let Some(values) = into.as_mut() {
                        values.push(l);
                    }
                }
            }
            i += 1;
        }
        let mut entry = match field {
            Some(field) => format!("field `{field}`: {what}"),
            None => what.to_owned(),
        };
        if !expected.is_empty() || !found.is_empty() {
            entry.push_str(&format!(
                " (expected {}, found {})",
                expected.join(" "),
                found.join(" ")
            ));
        }
        if !summary.contains(&entry) {
            summary.push(entry);
        }
    }
    if summary.is_empty() {
        full.trim().to_owned()
    } else {
        summary.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of abi_stable's report: both layouts in full, with `Error:` entries inside.
    const REPORT: &str = "\
Error:mismatched prefix type field count
    Expected:
        8
    Found:
        7

  field_name:execute
  field_name:save_state
Error:incompatible type
    Expected:
        extern fn(RStr, RStr)
    Found:
        extern fn(RStr, u64)

1 error(s)inside:
  field_name:save_state
Error:incompatible type
    Expected:
        extern fn(RStr, RStr)
    Found:
        extern fn(RStr, u64)
";

    #[test]
    fn keeps_each_difference_once_with_its_field() {
        assert_eq!(
            summarize_layout_errors(REPORT),
            "mismatched prefix type field count (expected 8, found 7)\n\
             field `save_state`: incompatible type (expected extern fn(RStr, RStr), found extern fn(RStr, u64))"
        );
    }

    #[test]
    fn a_report_without_errors_is_kept_whole() {
        assert_eq!(
            summarize_layout_errors("  something else  \n"),
            "something else"
        );
    }

    #[test]
    fn an_error_without_values_is_its_line() {
        assert_eq!(
            summarize_layout_errors("  Error:the plugin is odd\n"),
            "the plugin is odd"
        );
    }

    #[test]
    fn the_host_table_is_compatible_with_itself() {
        assert_eq!(
            check_table_layout(<PluginTableRef as StableAbi>::LAYOUT),
            Ok(())
        );
    }
}
