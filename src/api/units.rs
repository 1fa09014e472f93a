//! Durations (`90s`, `1h30m`) and byte quantities (`16Gi`) as written in specs: parsed with checked
//! arithmetic and bounded, so no value a user can type overflows a timer or a clock. The CRD's CEL
//! rules bound their shape; the ranges below are checked by [`bounded`] (reason `InvalidSpec`, exit 2
//! in sync-once).

use std::time::Duration;

/// CEL shape check shared by every duration field: 1–4 parts of at most 7 digits and a unit.
pub const DURATION_RULE: &str = "self.matches('^([0-9]{1,7}(ms|s|m|h|d)){1,4}$')";
/// Message of [`DURATION_RULE`].
pub const DURATION_MSG: &str = "must be a duration such as 90s, 5m, 6h or 1h30m (units ms, s, m, h, d)";
/// CEL shape check of byte quantities.
pub const QUANTITY_RULE: &str = "self.matches('^[0-9]{1,15}(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$')";
/// Message of [`QUANTITY_RULE`].
pub const QUANTITY_MSG: &str = "must be a byte quantity such as 512Mi, 16Gi or 1Ti";

/// The longest duration any field accepts.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 86_400);

const DAY: u64 = 86_400;

/// Parses a Kubernetes-style duration (`90s`, `5m`, `1h30m`, `2d`, `250ms`); at most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration".into());
    }
    let mut total_ms: u64 = 0;
    let mut rest = t;
    let too_long = || format!("{t:.40} is longer than {} (the longest fhirsync accepts)", show(MAX_DURATION));
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("{t:.40} is not a duration such as 90s, 5m, 6h"));
        }
        let n: u64 = rest[..digits].parse().map_err(|_| too_long())?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let per: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => DAY * 1_000,
            _ => {
                return Err(format!(
                    "{t:.40}: unknown unit {:?} (use ms, s, m, h or d)",
                    unit.chars().take(8).collect::<String>()
                ));
            }
        };
        total_ms = n.checked_mul(per).and_then(|ms| total_ms.checked_add(ms)).ok_or_else(too_long)?;
    }
    let d = Duration::from_millis(total_ms);
    if d > MAX_DURATION {
        return Err(too_long());
    }
    Ok(d)
}

/// Parses `value` of `field` and checks it lies in `min..=max`.
pub fn bounded(field: &str, value: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = parse_duration(value).map_err(|e| format!("{field}: {e}"))?;
    if d < min || d > max {
        return Err(format!("{field}: {} is outside {}..{}", show(d), show(min), show(max)));
    }
    Ok(d)
}

/// A duration the way specs write it (`1h30m`, `250ms`).
pub fn show(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    let mut rest = ms;
    for (unit, per) in [("d", 86_400_000u128), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
        if rest >= per {
            out.push_str(&format!("{}{unit}", rest / per));
            rest %= per;
        }
    }
    out
}

/// Parses a byte quantity (`512Mi`, `16Gi`, `1T`, `1000`).
pub fn parse_quantity(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits == 0 {
        return Err(format!("{t:.40} is not a byte quantity such as 512Mi or 16Gi"));
    }
    let n: u64 = t[..digits].parse().map_err(|_| format!("{t:.40} is too large"))?;
    let mult: u64 = match &t[digits..] {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        u => {
            return Err(format!(
                "{t:.40}: unknown unit {:?} (use Ki, Mi, Gi, Ti)",
                u.chars().take(8).collect::<String>()
            ));
        }
    };
    n.checked_mul(mult).ok_or_else(|| format!("{t:.40} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_never_overflow() {
        let table: &[(&str, Result<u64, &str>)] = &[
            ("90s", Ok(90_000)),
            ("1h30m", Ok(5_400_000)),
            ("250ms", Ok(250)),
            ("2d", Ok(172_800_000)),
            ("366d", Ok(366 * 86_400_000)),
            ("367d", Err("longer than")),
            ("18446744073709551615s1s", Err("longer than")),
            ("144115188075855872d", Err("longer than")),
            ("9999999d9999999d", Err("longer than")),
            ("5 minutes", Err("unknown unit")),
            ("m", Err("not a duration")),
            ("", Err("empty")),
            ("10x", Err("unknown unit")),
        ];
        for (input, want) in table {
            match (parse_duration(input), want) {
                (Ok(d), Ok(ms)) => assert_eq!(d.as_millis() as u64, *ms, "{input}"),
                (Err(e), Err(frag)) => assert!(e.contains(frag), "{input}: {e}"),
                (got, _) => panic!("{input}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn bounds_name_the_field() {
        let e = bounded("spec.runTimeout", "0s", Duration::from_secs(1), MAX_DURATION).unwrap_err();
        assert!(e.starts_with("spec.runTimeout: 0s is outside 1s.."), "{e}");
        assert_eq!(bounded("x", "90s", Duration::ZERO, MAX_DURATION).unwrap(), Duration::from_secs(90));
        assert_eq!(show(Duration::from_millis(5_400_250)), "1h30m250ms");
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("16Gi").unwrap(), 16 << 30);
        assert_eq!(parse_quantity("1T").unwrap(), 1_000_000_000_000);
        assert_eq!(parse_quantity("1000").unwrap(), 1000);
        assert!(parse_quantity("99999999999999Pi").unwrap_err().contains("too large"));
        assert!(parse_quantity("1GB").is_err());
    }
}
