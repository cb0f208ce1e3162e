//! The hosts file: one `host[:port]` a line, `#` comments, blank lines.

use std::path::Path;

use anyhow::{bail, Context};

use crate::client::normalize_host;

/// Hosts in file order, normalized to `host:port`, each once.
pub fn read_hosts(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the hosts file {}", path.display()))?;
    parse_hosts(&text, &path.display().to_string())
}

/// Parses the hosts file `name` (used in errors: "line 3 of hosts.txt").
pub fn parse_hosts(text: &str, name: &str) -> anyhow::Result<Vec<String>> {
    let mut hosts: Vec<(String, usize)> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line_number = index + 1;
        let line = raw.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        if line.split_whitespace().count() > 1 {
            bail!(
                "line {line_number} of {name}: {line:?} has more than one word; write one host[:port] a line"
            );
        }
        let host = normalize_host(line)
            .map_err(|err| anyhow::anyhow!("line {line_number} of {name}: {err}"))?;
        if let Some((_, first)) = hosts.iter().find(|(h, _)| *h == host) {
            bail!("line {line_number} of {name}: {host} is listed twice (first on line {first}); a host can be rolled out once");
        }
        hosts.push((host, line_number));
    }
    if hosts.is_empty() {
        bail!("no hosts in {name}: write one host[:port] a line");
    }
    Ok(hosts.into_iter().map(|(h, _)| h).collect())
}

#[cfg(test)]
mod tests {
    use super::parse_hosts;

    #[test]
    fn comments_blanks_and_default_port() {
        let hosts = parse_hosts("# fleet\n\nweb-1\n127.0.0.2:9000  # canary\n", "h").unwrap();
        assert_eq!(hosts, vec!["web-1:7700", "127.0.0.2:9000"]);
    }

    #[test]
    fn errors_name_the_line() {
        let err = parse_hosts("a\nb c\n", "h").unwrap_err();
        assert!(format!("{err:#}").contains("line 2"), "{err:#}");
        let err = parse_hosts("a\n\na:7700\n", "h").unwrap_err();
        assert!(
            format!("{err:#}").contains("line 3") && format!("{err:#}").contains("line 1"),
            "{err:#}"
        );
        let err = parse_hosts("x:http\n", "h").unwrap_err();
        assert!(format!("{err:#}").contains("line 1"), "{err:#}");
        assert!(parse_hosts("# nothing\n", "h").is_err());
        let err = parse_hosts("a\n# b\n127.0.0.3.7700\n", "hosts.txt").unwrap_err();
        assert!(
            format!("{err:#}")
                .starts_with("line 3 of hosts.txt: `127.0.0.3.7700` is not host[:port]"),
            "{err:#}"
        );
    }
}

/// `--limit`: the hosts of the file that match, in file order. `limit` is
/// a comma-separated list of hosts (`web-1`, `127.0.0.2:7700`; without a
/// port, any port of that host) or globs (`web-*`, `127.0.0.?:7700`; `*`
/// and `?`, matched against `host:port` and against the host alone). Every
/// entry must match some host: a typo must not silently shrink a rollout.
pub fn limit(hosts: Vec<String>, limit: &str, file_name: &str) -> anyhow::Result<Vec<String>> {
    let entries: Vec<&str> = limit
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    if entries.is_empty() {
        bail!(
            "--limit is empty: give hosts or globs, e.g. --limit 'web-1,web-2' or --limit 'web-*'"
        );
    }
    let matches = |entry: &str, host: &str| -> bool {
        let name = host.rsplit_once(':').map(|(n, _)| n).unwrap_or(host);
        if entry.contains(['*', '?']) {
            return glob(entry, host) || glob(entry, name);
        }
        let has_port = if entry.starts_with('[') {
            entry.contains("]:")
        } else {
            entry.contains(':')
        };
        if has_port {
            normalize_host(entry).is_ok_and(|e| e == host)
        } else {
            entry == name
        }
    };
    for entry in &entries {
        if !hosts.iter().any(|h| matches(entry, h)) {
            bail!(
                "--limit {entry:?} matches no host of {file_name} (it has {})",
                hosts.join(", ")
            );
        }
    }
    Ok(hosts
        .into_iter()
        .filter(|h| entries.iter().any(|e| matches(e, h)))
        .collect())
}

/// `*` any run of characters, `?` one character; the rest literally.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    // Iterative matching with one backtrack point for the last `*`.
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod limit_tests {
    use super::limit;

    fn hosts() -> Vec<String> {
        ["web-1:7700", "web-2:7700", "db-1:7700", "127.0.0.2:9000"]
            .map(String::from)
            .to_vec()
    }

    #[test]
    fn lists_globs_and_bare_names_select_in_file_order() {
        assert_eq!(
            limit(hosts(), "web-2,web-1", "h").unwrap(),
            ["web-1:7700", "web-2:7700"]
        );
        assert_eq!(
            limit(hosts(), "web-*", "h").unwrap(),
            ["web-1:7700", "web-2:7700"]
        );
        assert_eq!(limit(hosts(), "*:9000", "h").unwrap(), ["127.0.0.2:9000"]);
        assert_eq!(
            limit(hosts(), "127.0.0.2", "h").unwrap(),
            ["127.0.0.2:9000"]
        );
        assert_eq!(limit(hosts(), "db-?:7700", "h").unwrap(), ["db-1:7700"]);
        assert!(limit(hosts(), "127.0.0.2:7700", "h").is_err());
    }

    #[test]
    fn an_entry_that_matches_nothing_is_an_error_naming_it() {
        let err = limit(hosts(), "web-1,wbe-2", "hosts.txt")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"wbe-2\" matches no host of hosts.txt"),
            "{err}"
        );
        assert!(limit(hosts(), " , ", "h").is_err());
    }
}
