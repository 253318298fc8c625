//! Naming upstreams in configuration: CIDR blocks and ports, and which rule is most specific.
//!
//! Specificity: a longer prefix wins; at equal prefix length an exact port beats any port.
//! IPv4 upstreams also reported as IPv4-mapped IPv6 (`::ffff:a.b.c.d`) match IPv4 blocks.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, de};

/// An IPv4 or IPv6 block, e.g. `10.0.0.0/8`; a bare address is a single-address block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr(IpNet);

impl Cidr {
    /// Fails when `prefix` is too long for the family or `network` has host bits set.
    pub fn new(network: IpAddr, prefix: u8) -> Result<Self, String> {
        let net = IpNet::new(network, prefix).map_err(|_| {
            let max = if network.is_ipv4() { 32 } else { 128 };
            format!("prefix /{prefix} is longer than {max} bits")
        })?;
        if net.trunc() != net {
            let masked = net.trunc();
            return Err(format!("{net} has host bits set; did you mean {masked}?"));
        }
        Ok(Self(net))
    }

    pub fn network(&self) -> IpAddr {
        self.0.network()
    }

    pub fn prefix(&self) -> u8 {
        self.0.prefix_len()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&canonical(ip))
    }
}

/// IPv4-mapped IPv6 addresses as IPv4, everything else unchanged.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || {
            format!(
                "invalid CIDR {text:?}; write e.g. \"10.0.0.0/8\", \"2001:db8::/32\" or \"10.1.2.3\""
            )
        };
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address.parse().map_err(|_| invalid())?;
        let prefix = match prefix {
            Some(prefix) => prefix.parse().map_err(|_| invalid())?,
            None if network.is_ipv4() => 32,
            None => 128,
        };
        // An IPv4-mapped block is the IPv4 block it maps, so it matches IPv4 upstreams.
        match (network, canonical(network)) {
            (IpAddr::V6(_), v4 @ IpAddr::V4(_)) if prefix >= 96 => Self::new(v4, prefix - 96),
            _ => Self::new(network, prefix),
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(de::Error::custom)
    }
}

/// Upstreams in a block, on some ports (`ports` empty means any port).
///
/// In TOML: `{ cidr = "10.0.0.0/8", ports = [443, 8443] }`, or without `ports` for any port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Selector {
    pub cidr: Cidr,
    pub ports: Vec<u16>,
}

/// How precisely a rule names an upstream; larger is more specific.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Specificity {
    pub prefix: u8,
    pub exact_port: bool,
}

impl Selector {
    pub fn any_port(cidr: Cidr) -> Self {
        Self {
            cidr,
            ports: Vec::new(),
        }
    }

    /// How specifically this selector names `upstream`, if it matches at all.
    pub fn matches(&self, upstream: SocketAddr) -> Option<Specificity> {
        self.pairs()
            .filter_map(|(cidr, port)| match_pair(cidr, port, upstream))
            .max()
    }

    /// The (block, port) pairs this selector stands for; `None` is any port.
    pub fn pairs(&self) -> impl Iterator<Item = (Cidr, Option<u16>)> + '_ {
        let any = self.ports.is_empty().then_some((self.cidr, None));
        any.into_iter()
            .chain(self.ports.iter().map(|&port| (self.cidr, Some(port))))
    }
}

/// How specifically the block `cidr` on `port` (`None`: any port) names `upstream`, if at
/// all.
pub fn match_pair(cidr: Cidr, port: Option<u16>, upstream: SocketAddr) -> Option<Specificity> {
    let port_matches = port.is_none_or(|port| port == upstream.port());
    (port_matches && cidr.contains(upstream.ip())).then_some(Specificity {
        prefix: cidr.prefix(),
        exact_port: port.is_some(),
    })
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ports.as_slice() {
            [] => write!(f, "{} (any port)", self.cidr),
            ports => {
                let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
                write!(f, "{} port {}", self.cidr, ports.join(","))
            }
        }
    }
}

/// As written in the configuration: `{ cidr = "10.0.0.0/8", ports = [443] }`.
impl serde::Serialize for Selector {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut out = serializer.serialize_struct("Selector", 2)?;
        out.serialize_field("cidr", &self.cidr)?;
        if self.ports.is_empty() {
            out.skip_field("ports")?;
        } else {
            out.serialize_field("ports", &self.ports)?;
        }
        out.end()
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SelectorTable {
    cidr: Cidr,
    ports: Option<Vec<u16>>,
}

impl<'de> Deserialize<'de> for Selector {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let SelectorTable { cidr, ports } = SelectorTable::deserialize(deserializer)?;
        let ports = match ports {
            None => Vec::new(),
            Some(ports) if ports.is_empty() => {
                return Err(de::Error::custom(
                    "`ports` is empty; leave it out to match any port",
                ));
            }
            Some(ports) if ports.contains(&0) => {
                return Err(de::Error::custom("port 0 is not an upstream port"));
            }
            Some(ports) => ports,
        };
        Ok(Self { cidr, ports })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_parse_and_match() {
        assert_eq!(cidr("10.1.2.3").prefix(), 32);
        assert_eq!(cidr("::1").prefix(), 128);
        assert!(cidr("10.0.0.0/8").contains("10.255.0.1".parse().unwrap()));
        assert!(!cidr("10.0.0.0/8").contains("11.0.0.1".parse().unwrap()));
        assert!(cidr("0.0.0.0/0").contains("192.0.2.1".parse().unwrap()));
        assert!(!cidr("0.0.0.0/0").contains("2001:db8::1".parse().unwrap()));
        assert!(cidr("::/0").contains("2001:db8::1".parse().unwrap()));
        // The kernel may report IPv4 upstreams v4-mapped.
        assert!(cidr("10.0.0.0/8").contains("::ffff:10.0.0.1".parse().unwrap()));
        assert_eq!(cidr("::ffff:10.0.0.0/104").to_string(), "10.0.0.0/8");
    }

    #[test]
    fn mistakes_are_explained() {
        let err = "10.0.0.1/8".parse::<Cidr>().unwrap_err();
        assert!(err.contains("did you mean 10.0.0.0/8"), "{err}");
        assert!(
            "10.0.0.0/33"
                .parse::<Cidr>()
                .unwrap_err()
                .contains("longer than 32")
        );
        assert!("ten".parse::<Cidr>().unwrap_err().contains("invalid CIDR"));
    }

    #[test]
    fn specificity_prefers_longer_prefixes_then_exact_ports() {
        let wide = Selector::any_port(cidr("10.0.0.0/8"));
        let wide_port = Selector {
            cidr: cidr("10.0.0.0/8"),
            ports: vec![443],
        };
        let narrow = Selector::any_port(cidr("10.1.0.0/16"));
        let upstream = addr("10.1.2.3:443");
        let (a, b, c) = (
            wide.matches(upstream).unwrap(),
            wide_port.matches(upstream).unwrap(),
            narrow.matches(upstream).unwrap(),
        );
        assert!(a < b && b < c);
        assert_eq!(wide_port.matches(addr("10.1.2.3:80")), None);
    }

    #[test]
    fn selectors_deserialize_from_tables() {
        #[derive(Deserialize)]
        struct Doc {
            s: Vec<Selector>,
        }
        let doc: Doc =
            toml::from_str("s = [{ cidr = \"10.0.0.0/8\" }, { cidr = \"::1\", ports = [53] }]")
                .unwrap();
        assert_eq!(doc.s[0], Selector::any_port(cidr("10.0.0.0/8")));
        assert_eq!(
            doc.s[1].pairs().collect::<Vec<_>>(),
            [(cidr("::1"), Some(53))]
        );
        let err = toml::from_str::<Doc>("s = [{ cidr = \"10.0.0.0/8\", ports = [] }]")
            .err()
            .unwrap();
        assert!(err.message().contains("leave it out"), "{err}");
    }
}
