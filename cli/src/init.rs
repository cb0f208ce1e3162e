//! `reloadctl init`: a commented project file and a hosts file to start
//! from, set up for a local trial (agents on 127.0.0.2-4); with
//! `--recipe NAME`, also the agent's `[[service]]` section for a program
//! people already run (gunicorn, uvicorn, Node, Go, nginx, HAProxy), as
//! `docs/recipes/README.md` explains and `tests/tests/e2e/recipes.rs` tests
//! it.

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
stage_first = false             # true: stage every host before the canary (slower; a host that
                                # cannot be staged then stops the push with nothing changed)
"#
    )
}

const HOSTS_FILE: &str = "# One agent a line: host or host:port (default port 7700).
# These are loopback addresses for a local trial: start an agent on each.
127.0.0.2:7700
127.0.0.3:7700
127.0.0.4:7700
";

/// The `[[service]]` sections of `docs/recipes/`, by recipe name: the same
/// files the end-to-end tests run each program with.
pub const RECIPES: &[(&str, &str)] = &[
    (
        "gunicorn-sync",
        include_str!("../recipes/gunicorn-sync.toml"),
    ),
    (
        "gunicorn-gthread",
        include_str!("../recipes/gunicorn-gthread.toml"),
    ),
    ("uvicorn", include_str!("../recipes/uvicorn.toml")),
    ("node", include_str!("../recipes/node.toml")),
    ("go", include_str!("../recipes/go.toml")),
    ("nginx", include_str!("../recipes/nginx.toml")),
    ("haproxy", include_str!("../recipes/haproxy.toml")),
];

/// The recipe's service section, for the service `service`.
fn recipe_section(recipe: &str, service: &str) -> anyhow::Result<String> {
    let (_, text) = RECIPES
        .iter()
        .find(|(name, _)| *name == recipe)
        .ok_or_else(|| {
            let names: Vec<&str> = RECIPES.iter().map(|(name, _)| *name).collect();
            anyhow::anyhow!("no recipe {recipe:?}; there are: {}", names.join(", "))
        })?;
    // Every recipe names its service "web" once.
    Ok(text.replacen("name = \"web\"", &format!("name = \"{service}\""), 1))
}

pub fn init(dir: &Path, service: &str, recipe: Option<&str>, force: bool) -> anyhow::Result<()> {
    reload_artifact::manifest::validate_service_name(service)?;
    std::fs::create_dir_all(dir.join("releases"))?;
    let project = dir.join(crate::rollout::project::DEFAULT_FILE);
    let hosts = dir.join("hosts.txt");
    let section = recipe.map(|r| recipe_section(r, service)).transpose()?;
    write_atomically(&project, project_file(service).as_bytes(), 0o644, force)?;
    write_atomically(&hosts, HOSTS_FILE.as_bytes(), 0o644, force)?;
    println!(
        "wrote {} and {} (and the folder releases/)",
        project.display(),
        hosts.display()
    );
    if let (Some(recipe), Some(section)) = (recipe, section) {
        let path = dir.join(format!("{service}.service.toml"));
        write_atomically(&path, section.as_bytes(), 0o644, force)?;
        println!(
            "wrote {}: the {recipe} recipe's [[service]] section; append it to each agent's config (docs/recipes/README.md)",
            path.display()
        );
    }
    println!("next: reloadctl keygen --out release; sign a build into releases/; reloadctl push --version 1.0 hosts.txt");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_project_file_parses_as_written() {
        let dir = tempfile::tempdir().unwrap();
        super::init(dir.path(), "web", None, false).unwrap();
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
        assert!(super::init(dir.path(), "web", None, false).is_err());
    }

    #[test]
    fn a_recipe_writes_its_service_section_under_the_service_name() {
        let dir = tempfile::tempdir().unwrap();
        super::init(dir.path(), "shop", Some("gunicorn-sync"), false).unwrap();
        let section = std::fs::read_to_string(dir.path().join("shop.service.toml")).unwrap();
        assert!(
            section.contains("[[service]]\nname = \"shop\"\n"),
            "{section}"
        );
        assert!(section.contains("signal = \"SIGTERM\""), "{section}");
        let err = super::init(dir.path(), "shop", Some("tomcat"), true).unwrap_err();
        assert!(
            err.to_string().contains("gunicorn-sync, gunicorn-gthread"),
            "{err}"
        );
    }

    /// Every file in cli/recipes/ is a recipe `init` knows, and each names
    /// its service "web" once and listens on the one placeholder address.
    #[test]
    fn every_recipe_file_is_offered() {
        let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
        let mut files: Vec<String> = std::fs::read_dir(&folder)
            .unwrap()
            .map(|e| {
                e.unwrap()
                    .file_name()
                    .to_string_lossy()
                    .replace(".toml", "")
            })
            .collect();
        files.sort();
        let mut known: Vec<String> = super::RECIPES.iter().map(|(n, _)| n.to_string()).collect();
        known.sort();
        assert_eq!(files, known);
        for (name, text) in super::RECIPES {
            assert_eq!(text.matches("name = \"web\"").count(), 1, "{name}");
            assert_eq!(text.matches("tcp = \"0.0.0.0:8080\"").count(), 1, "{name}");
        }
    }
}
