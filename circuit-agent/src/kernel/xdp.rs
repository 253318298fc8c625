//! Attaching the XDP enforcement point, with the mode chosen per interface.
//!
//! Native XDP_TX on a veth silently drops the frame unless the peer veth also runs an XDP
//! program, so `auto` uses generic (skb) mode on veth and native mode elsewhere, falling
//! back to generic when the driver has no native support.

use std::{fmt, os::fd::AsRawFd};

use anyhow::Context;
use aya::programs::XdpMode;

#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    clap::ValueEnum,
    serde::Deserialize,
    serde::Serialize,
)]
#[serde(rename_all = "snake_case")]
pub enum XdpModeChoice {
    /// Native where the driver supports it and XDP_TX works; generic on veth.
    #[default]
    Auto,
    /// Driver (native) mode only; fails where the driver has none.
    Native,
    /// Generic (skb) mode: works on any interface, slower.
    Generic,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachedXdp {
    pub interface: String,
    /// "native", "generic", or "taken over" (a previous agent's link, whose mode it keeps).
    pub mode: String,
}

impl fmt::Display for AttachedXdp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.interface, self.mode)
    }
}

/// The mode to try first on `iface`.
pub(super) fn choose_mode(iface: &str, choice: XdpModeChoice) -> anyhow::Result<XdpMode> {
    Ok(match choice {
        XdpModeChoice::Generic => XdpMode::Skb,
        XdpModeChoice::Native => XdpMode::Driver,
        XdpModeChoice::Auto => {
            let driver = driver_name(iface)
                .with_context(|| format!("no interface {iface} in this network namespace"))?;
            if driver == "veth" {
                tracing::info!(
                    iface,
                    "veth: using generic XDP (native XDP_TX on veth needs an XDP program on the peer)"
                );
                XdpMode::Skb
            } else {
                XdpMode::Driver
            }
        }
    })
}

/// The kernel driver behind `iface` (ETHTOOL_GDRVINFO), in the caller's network namespace.
fn driver_name(iface: &str) -> anyhow::Result<String> {
    // linux/ethtool.h; neither libc nor nix has it.
    const ETHTOOL_GDRVINFO: u32 = 3;
    // struct ethtool_drvinfo: cmd, driver[32], then fields we do not read.
    let mut info = [0u8; 196];
    info[..4].copy_from_slice(&ETHTOOL_GDRVINFO.to_ne_bytes());

    let name = iface.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        anyhow::bail!("invalid interface name {iface:?}");
    }
    // SAFETY: ifreq is plain data; an all-zero value is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_data = info.as_mut_ptr().cast();

    let sock = std::net::UdpSocket::bind("0.0.0.0:0")
        .or_else(|_| std::net::UdpSocket::bind("[::]:0"))
        .context("cannot open a socket for ethtool")?;
    // SAFETY: SIOCETHTOOL reads ifreq and writes at most sizeof(ethtool_drvinfo) into `info`,
    // which outlives the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut req) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SIOCETHTOOL failed");
    }
    let driver = &info[4..36];
    let end = driver.iter().position(|b| *b == 0).unwrap_or(driver.len());
    Ok(String::from_utf8_lossy(&driver[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_or_invalid_interfaces_are_errors() {
        // The veth case (driver "veth" → generic mode) is covered end to end.
        assert!(driver_name("no-such-if0").is_err());
        assert!(driver_name("a-name-longer-than-ifnamsiz").is_err());
        assert!(driver_name("").is_err());
    }
}
