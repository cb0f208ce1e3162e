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
