//! The pinned OVERRIDES map: what operators asked (`trip`, `disable`, `reset`). The CLI
//! writes it, the running agent (or the next one) applies it to the engine.

use std::{net::SocketAddr, path::Path};

use anyhow::Context;
use aya::maps::{HashMap, Map, MapData};
use circuit_common::{Override, OverrideKind, UpstreamKey, map_names};

use super::{is_not_found, open_pinned, socket_addr, upstream_key};
use crate::time::MonoTime;

/// One operator override, as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredOverride {
    pub upstream: SocketAddr,
    pub kind: OverrideKind,
    /// When a forced open ends; None for "until reset".
    pub until: Option<MonoTime>,
    pub set_at: MonoTime,
}

pub struct OverrideTable {
    map: HashMap<MapData, UpstreamKey, Override>,
}

impl OverrideTable {
    pub fn open_pinned(pin_dir: &Path) -> anyhow::Result<Self> {
        let map = HashMap::try_from(Map::HashMap(open_pinned(pin_dir, map_names::OVERRIDES)?))
            .context("OVERRIDES is not the expected hash map")?;
        Ok(Self { map })
    }

    pub fn set(
        &mut self,
        upstream: SocketAddr,
        kind: OverrideKind,
        until: Option<MonoTime>,
        now: MonoTime,
    ) -> anyhow::Result<()> {
        let value = Override {
            kind: kind as u8,
            _pad: [0; 7],
            until_ns: until.map_or(0, MonoTime::as_nanos),
            set_at_ns: now.as_nanos(),
        };
        self.map
            .insert(upstream_key(upstream), value, 0)
            .with_context(|| format!("cannot record the override for {upstream}"))
    }

    pub fn remove(&mut self, upstream: SocketAddr) -> anyhow::Result<()> {
        match self.map.remove(&upstream_key(upstream)) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot remove the override for {upstream}")),
        }
    }

    pub fn list(&self) -> anyhow::Result<Vec<StoredOverride>> {
        let mut all = Vec::new();
        for entry in self.map.iter() {
            let (key, value) = entry.context("cannot iterate the override map")?;
            if let Some(kind) = OverrideKind::from_u8(value.kind) {
                all.push(StoredOverride {
                    upstream: socket_addr(&key),
                    kind,
                    until: (value.until_ns != 0).then(|| MonoTime::from_nanos(value.until_ns)),
                    set_at: MonoTime::from_nanos(value.set_at_ns),
                });
            }
        }
        all.sort_by_key(|o| (o.upstream.ip(), o.upstream.port()));
        Ok(all)
    }
}
