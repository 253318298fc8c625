//! Small value types for policies: fixed-point so policies stay `Eq` and rate comparisons are
//! exact integer arithmetic, and each parses from the plain TOML value an operator writes.

use std::{fmt, str::FromStr, time::Duration};

use serde::{Deserialize, Deserializer, de};

/// A percentage with two decimals, stored in basis points (1/100 of a percent).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Percent(u32);

const BASIS_POINTS_PER_WHOLE: u32 = 10_000;

impl Percent {
    pub const ZERO: Percent = Percent(0);
    pub const HUNDRED: Percent = Percent(BASIS_POINTS_PER_WHOLE);

    /// `percent` whole percent, at most 100.
    pub const fn new(percent: u32) -> Self {
        assert!(percent <= 100, "a percentage is at most 100");
        Self(percent * 100)
    }

    /// At most 10 000 (100 %).
    pub const fn from_basis_points(basis_points: u32) -> Self {
        assert!(
            basis_points <= BASIS_POINTS_PER_WHOLE,
            "a percentage is at most 100"
        );
        Self(basis_points)
    }

    /// `part / whole`, rounded down to a basis point; 0 when `whole` is 0.
    pub fn of(part: u64, whole: u64) -> Self {
        if whole == 0 {
            return Self::ZERO;
        }
        let bp =
            u128::from(part.min(whole)) * u128::from(BASIS_POINTS_PER_WHOLE) / u128::from(whole);
        Self(bp as u32)
    }

    /// From a share in `0.0..=1.0` (clamped), rounded to the nearest basis point.
    pub fn from_fraction(fraction: f64) -> Self {
        Self((fraction.clamp(0.0, 1.0) * f64::from(BASIS_POINTS_PER_WHOLE)).round() as u32)
    }

    pub const fn basis_points(self) -> u32 {
        self.0
    }

    pub fn as_fraction(self) -> f64 {
        f64::from(self.0) / f64::from(BASIS_POINTS_PER_WHOLE)
    }

    /// Whether `part / whole` is at least this percentage, exactly; never with `whole` 0.
    pub fn is_reached_by(self, part: u64, whole: u64) -> bool {
        whole > 0
            && u128::from(part) * u128::from(BASIS_POINTS_PER_WHOLE)
                >= u128::from(self.0) * u128::from(whole)
    }

    /// Whether `part / whole` is strictly above this percentage; never with `whole` 0.
    pub fn is_exceeded_by(self, part: u64, whole: u64) -> bool {
        whole > 0
            && u128::from(part) * u128::from(BASIS_POINTS_PER_WHOLE)
                > u128::from(self.0) * u128::from(whole)
    }

    /// This share of `full`, rounded to nearest: e.g. `scaled_to(65_536)` for a kernel that
    /// compares against a 16-bit random number.
    pub fn scaled_to(self, full: u32) -> u32 {
        let half = u64::from(BASIS_POINTS_PER_WHOLE) / 2;
        ((u64::from(self.0) * u64::from(full) + half) / u64::from(BASIS_POINTS_PER_WHOLE)) as u32
    }

    /// Saturating at 100 %.
    pub fn saturating_add(self, other: Percent) -> Percent {
        Percent((self.0 + other.0).min(BASIS_POINTS_PER_WHOLE))
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_fixed_point(f, u64::from(self.0), 100)?;
        f.write_str("%")
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = f64::deserialize(deserializer)?;
        if !(0.0..=100.0).contains(&value) {
            return Err(de::Error::custom(format_args!(
                "must be between 0 and 100, got {value}"
            )));
        }
        Ok(Self::from_fraction(value / 100.0))
    }
}

/// A multiplier with three decimals, at least 0 (policies check their own lower bounds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Factor(u32);

const MILLIS_PER_UNIT: u32 = 1_000;

impl Factor {
    pub const ONE: Factor = Factor(MILLIS_PER_UNIT);

    /// `thousandths / 1000`, e.g. `Factor::from_thousandths(1_500)` is 1.5.
    pub const fn from_thousandths(thousandths: u32) -> Self {
        Self(thousandths)
    }

    pub const fn whole(value: u32) -> Self {
        Self(value * MILLIS_PER_UNIT)
    }

    pub const fn thousandths(self) -> u32 {
        self.0
    }

    pub fn as_f64(self) -> f64 {
        f64::from(self.0) / f64::from(MILLIS_PER_UNIT)
    }
}

impl fmt::Display for Factor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_fixed_point(f, u64::from(self.0), u64::from(MILLIS_PER_UNIT))?;
        f.write_str("x")
    }
}

impl<'de> Deserialize<'de> for Factor {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = f64::deserialize(deserializer)?;
        // The upper bound only keeps the fixed-point value in range; no policy wants more.
        if !(0.0..=1_000.0).contains(&value) {
            return Err(de::Error::custom(format_args!(
                "must be between 0 and 1000, got {value}"
            )));
        }
        Ok(Self((value * f64::from(MILLIS_PER_UNIT)).round() as u32))
    }
}

/// `value / scale` with as many decimals as needed (at most those of `scale`).
fn write_fixed_point(f: &mut fmt::Formatter<'_>, value: u64, scale: u64) -> fmt::Result {
    let (whole, mut rest) = (value / scale, value % scale);
    write!(f, "{whole}")?;
    if rest == 0 {
        return Ok(());
    }
    f.write_str(".")?;
    let mut digit_scale = scale / 10;
    while rest > 0 && digit_scale > 0 {
        write!(f, "{}", rest / digit_scale)?;
        rest %= digit_scale;
        digit_scale /= 10;
    }
    Ok(())
}

/// A duration written the way humans do in the config file: `"30s"`, `"1m 30s"`, `"250ms"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

impl From<Duration> for HumanDuration {
    fn from(value: Duration) -> Self {
        Self(value)
    }
}

impl serde::Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_duration(self.0))
    }
}

/// As written in the configuration: a number of percent.
impl serde::Serialize for Percent {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(self.as_fraction() * 100.0)
    }
}

impl serde::Serialize for Factor {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(self.as_f64())
    }
}

impl From<HumanDuration> for Duration {
    fn from(value: HumanDuration) -> Self {
        value.0
    }
}

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(text).map(Self).map_err(|err| {
            format!(
                "invalid duration {text:?} ({err}); write e.g. \"30s\", \"1m 30s\" or \"250ms\""
            )
        })
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(de::Error::custom)
    }
}

/// A duration rounded to milliseconds, for humans.
pub fn format_millis(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_compares_rates_exactly() {
        let half = Percent::new(50);
        assert!(half.is_reached_by(1, 2));
        assert!(!half.is_exceeded_by(1, 2));
        assert!(half.is_exceeded_by(51, 100));
        assert!(!half.is_reached_by(49, 100));
        assert!(
            !Percent::ZERO.is_reached_by(0, 0),
            "no calls never reach a rate"
        );
        assert_eq!(Percent::of(1, 3).basis_points(), 3_333);
        assert_eq!(Percent::of(5, 0), Percent::ZERO);
        assert_eq!(Percent::HUNDRED.scaled_to(65_536), 65_536);
        assert_eq!(Percent::new(25).scaled_to(65_536), 16_384);
    }

    #[test]
    fn values_display_without_needless_decimals() {
        assert_eq!(Percent::new(50).to_string(), "50%");
        assert_eq!(Percent::from_basis_points(1_250).to_string(), "12.5%");
        assert_eq!(Percent::from_basis_points(3_333).to_string(), "33.33%");
        assert_eq!(Percent::from_basis_points(5).to_string(), "0.05%");
        assert_eq!(Factor::whole(2).to_string(), "2x");
        assert_eq!(Factor::from_thousandths(1_500).to_string(), "1.5x");
    }

    #[test]
    fn durations_parse_humantime_and_explain_mistakes() {
        assert_eq!(
            "1m 30s".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(90)
        );
        let err = "30".parse::<HumanDuration>().unwrap_err();
        assert!(err.contains("invalid duration \"30\""), "{err}");
    }
}
