//! Maps pinned by an earlier agent are reused only when they are what this agent's programs
//! declare: the same type, key size, value size and capacity. The loader itself checks
//! nothing, and a program would then read a map of another shape (an older layout after an
//! upgrade, or anything another process pinned under that name).
//!
//! A mismatched map that only holds kernel bookkeeping (in-flight connections, counters,
//! admissions) is unpinned, so that the loader makes a fresh one: its contents are lost,
//! which costs at most the outcomes of connections in flight. A mismatched map holding
//! state that an operator or a breaker relies on (verdicts, operator commands) stops the
//! agent with a clear error instead: dropping it would silently lift isolations.

use std::path::Path;

use anyhow::{Context, bail};
use aya::maps::MapData;
use aya_obj::{Object, maps::PinningType};
use circuit_common::map_names;

/// Maps whose contents must not be dropped silently.
const STATE: [&str; 2] = [map_names::VERDICTS, map_names::OVERRIDES];

/// The shape of a map, as declared or as found.
#[derive(Debug, PartialEq, Eq)]
struct Shape {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

/// Checks every pinned map `object` declares against what is pinned in `pin_dir`; unpins
/// stale bookkeeping maps (logged), fails on stale state maps. Returns the names unpinned.
pub fn reconcile(pin_dir: &Path, object: &[u8]) -> anyhow::Result<Vec<String>> {
    let object = Object::parse(object).context("cannot parse circuit's kernel programs")?;
    let mut replaced = Vec::new();
    for (name, def) in &object.maps {
        if !matches!(def.pinning(), PinningType::ByName) {
            continue;
        }
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let wanted = Shape {
            map_type: def.map_type(),
            key_size: def.key_size(),
            value_size: def.value_size(),
            max_entries: def.max_entries(),
        };
        let found_text = match pinned_shape(&path) {
            Ok(found) if found == wanted => continue,
            Ok(found) => format!("{found:?}"),
            Err(problem) => problem,
        };
        if STATE.contains(&name.as_str()) {
            bail!(
                "{} is not the map this agent needs ({found_text}, wanted {wanted:?}); it holds verdicts or operator commands, so it is not replaced silently: check it, then remove it with `circuit-agent detach`",
                path.display()
            );
        }
        tracing::warn!(
            map = %path.display(),
            found = %found_text,
            wanted = ?wanted,
            "pinned map from another version: replaced by a fresh one (its kernel bookkeeping is lost)"
        );
        std::fs::remove_file(&path)
            .with_context(|| format!("cannot unpin the stale map {}", path.display()))?;
        replaced.push(name.clone());
    }
    replaced.sort();
    Ok(replaced)
}

/// The names under which the agent pins maps: those `object` declares pinned by name, and
/// CONTROL, which the agent pins itself.
pub fn pinned_map_names(object: &[u8]) -> anyhow::Result<Vec<String>> {
    let object = Object::parse(object).context("cannot parse circuit's kernel programs")?;
    let mut names: Vec<String> = object
        .maps
        .iter()
        .filter(|(_, def)| matches!(def.pinning(), PinningType::ByName))
        .map(|(name, _)| name.clone())
        .collect();
    names.push(map_names::CONTROL.to_owned());
    Ok(names)
}

/// The shape of the map pinned at `path`, or what is wrong with it (not a map, unreadable).
fn pinned_shape(path: &Path) -> Result<Shape, String> {
    let map = MapData::from_pin(path).map_err(|e| format!("cannot be opened as a map: {e}"))?;
    let info = map.info().map_err(|e| format!("unreadable: {e}"))?;
    Ok(Shape {
        map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
    })
}
