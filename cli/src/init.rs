//! `reloadctl init`: a commented project file and a hosts file to start
//! from, set up for a local trial (agents on 127.0.0.2-4).

use std::path::Path;

use crate::write_atomically;

fn project_file(service: &str) -> String {
    format!(
        r#"# reloadctl project file: what `reloadctl push` deploys, from where, and how.
# Every [rollout] setting can be overridden by the push flag of the same name.

# The service the agents know this program as (their [[service]] name).
service = "{service}"

# Where signed releases are: {{version}} is replaced by each spelling of the
# version you type (1.4, 1.4.0, v1.4...), and the file whose signature says
# that version is the release. Sign with:
#   reloadctl sign --key release.key --service {service} --version 1.4 releases/{service}-1.4
artifact = "releases/{service}-{{version}}"

# On each host, before a release replaces anything, the agent runs it once
# as `<release> --version` (the agent's [service.preflight] args), and after
# READY keeps it on probation beside the old process ([service.probation],
# 2 s by default): a release that cannot start, exits or fails its health
# check is reverted by the agent itself. Give a program that does not take
# --version other preflight args in the agent's config.

# Public keys a release must be signed by; checked before any agent is
# contacted. Make a key pair with: reloadctl keygen --out release
trusted_keys = ["release.pub"]

# Mutual TLS to the agents (`reloadctl certs` makes a development set).
# Without it reloadctl talks plaintext to loopback agents only.
# [tls]
# ca = "certs/ca.pem"
# cert = "certs/deployer.pem"
# key = "certs/deployer.key"

[rollout]
canary = 1                      # hosts in the first wave, alone
waves = "1,10%,50%,100%"        # cumulative sizes after the canary
max_parallel = 4                # hosts changed at once within a wave
healthy_checks = 3              # consecutive healthy results a host needs...
min_healthy_time = "10s"        # ...spanning at least this long
healthy_deadline = "2m"         # a host not healthy by then has failed
progress_deadline = "30m"       # the whole rollout
max_failures = "0"              # failed hosts tolerated: a count or a percentage
auto_revert = true              # roll back the hosts this rollout changed when it halts
pause_between_waves = "0s"
"#
    )
}

const HOSTS_FILE: &str = "# One agent a line: host or host:port (default port 7700).
# These are loopback addresses for a local trial: start an agent on each.
127.0.0.2:7700
127.0.0.3:7700
127.0.0.4:7700
";

pub fn init(dir: &Path, service: &str, force: bool) -> anyhow::Result<()> {
    reload_artifact::manifest::validate_service_name(service)?;
    std::fs::create_dir_all(dir.join("releases"))?;
    let project = dir.join(crate::rollout::project::DEFAULT_FILE);
    let hosts = dir.join("hosts.txt");
    write_atomically(&project, project_file(service).as_bytes(), 0o644, force)?;
    write_atomically(&hosts, HOSTS_FILE.as_bytes(), 0o644, force)?;
    println!(
        "wrote {} and {} (and the folder releases/)",
        project.display(),
        hosts.display()
    );
    println!("next: reloadctl keygen --out release; sign a build into releases/; reloadctl push --version 1.0 hosts.txt");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_project_file_parses_as_written() {
        let dir = tempfile::tempdir().unwrap();
        super::init(dir.path(), "web", false).unwrap();
        let project =
            crate::rollout::project::Project::load(&dir.path().join("reloadctl.toml")).unwrap();
        assert_eq!(project.service, "web");
        assert_eq!(project.rollout.max_parallel, 4);
        assert_eq!(
            crate::rollout::hosts::read_hosts(&dir.path().join("hosts.txt"))
                .unwrap()
                .len(),
            3
        );
        // Never overwritten by accident.
        assert!(super::init(dir.path(), "web", false).is_err());
    }
}
