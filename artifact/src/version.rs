//! Versions are semantic versions, but people write `1.4`: it means `1.4.0`.

use semver::Version;

/// Parses `1`, `1.4`, `1.4.0`, `v1.4.0` or a full semver such as
/// `1.4.0-rc.1+build.5` into a normalized [`Version`].
pub fn parse_version(text: &str) -> Result<Version, String> {
    let trimmed = text.trim();
    let bare = trimmed.strip_prefix('v').unwrap_or(trimmed);
    // Pad only the numeric core (before any pre-release or build suffix).
    let split_at = bare.find(['-', '+']).unwrap_or(bare.len());
    let (core, suffix) = bare.split_at(split_at);
    let parts = core.split('.').count();
    let padded = match parts {
        1 => format!("{core}.0.0{suffix}"),
        2 => format!("{core}.0{suffix}"),
        _ => bare.to_string(),
    };
    Version::parse(&padded).map_err(|err| {
        format!("version {text:?} is not a semantic version ({err}); write it like 1.4 or 1.4.2")
    })
}

#[cfg(test)]
mod tests {
    use super::parse_version;

    #[test]
    fn short_versions_are_padded() {
        assert_eq!(parse_version("1.4").unwrap().to_string(), "1.4.0");
        assert_eq!(parse_version("2").unwrap().to_string(), "2.0.0");
        assert_eq!(parse_version("v1.4.2").unwrap().to_string(), "1.4.2");
        assert_eq!(
            parse_version("1.4-rc.1+b5").unwrap().to_string(),
            "1.4.0-rc.1+b5"
        );
    }

    #[test]
    fn garbage_is_refused_with_the_input_named() {
        let err = parse_version("one.four").unwrap_err();
        assert!(err.contains("\"one.four\""), "{err}");
        assert!(parse_version("").is_err());
        assert!(parse_version("1.4.0.1").is_err());
    }
}
