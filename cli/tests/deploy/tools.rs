//! The two programs the deploy tests run: kubectl (kustomize) and kubernetes-validate.
//! scripts/test.sh installs both when missing (scripts/install-deploy-tools.sh) and passes
//! their paths; a run without them fails here, naming what to do, rather than skipping.

use std::path::PathBuf;

fn tool(env: &str, fallback: impl FnOnce() -> Option<PathBuf>) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    fallback().unwrap_or_else(|| {
        panic!(
            "{env} is not set and no default was found: run scripts/test.sh, or \
             `eval \"$(scripts/install-deploy-tools.sh)\"; export {env}` first"
        )
    })
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| PathBuf::from(d).join(name))
        .find(|p| p.is_file())
}

pub fn kubectl() -> PathBuf {
    tool("MOE_KUBECTL", || on_path("kubectl"))
}

/// The validator: $MOE_KUBERNETES_VALIDATE, else where scripts/install-deploy-tools.sh puts it.
pub fn kubernetes_validate() -> PathBuf {
    tool("MOE_KUBERNETES_VALIDATE", || {
        let home = std::env::var_os("HOME")?;
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(home).join(".cache"));
        let path = cache.join("moe-deploy-tools/venv-kubernetes-validate-1.37.0/bin/kubernetes-validate");
        path.is_file()
            .then_some(path)
            .or_else(|| on_path("kubernetes-validate"))
    })
}
