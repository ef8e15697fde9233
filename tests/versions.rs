//! The version has one source, Cargo.toml: every other place that states it must agree.
//! (The Fiji About command, `lumos --version` and `lumos.__version__` are checked where
//! they run: fiji-plugin/tests, tests/cli.rs, bindings/python/tests.)
use std::ffi::CStr;
use std::path::Path;

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The value of `key = "..."` in the `[section]` table of a TOML file.
fn toml_value(text: &str, section: &str, key: &str) -> Option<String> {
    let mut inside = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            inside = t == format!("[{section}]");
        } else if inside
            && let Some(rest) = t.strip_prefix(key)
            && let Some(v) = rest.trim_start().strip_prefix('=')
        {
            return Some(v.trim().trim_matches('"').to_string());
        }
    }
    None
}

#[test]
fn library_reports_the_cargo_version() {
    let v = unsafe { CStr::from_ptr(lumos::ffi::lumos_version()) };
    assert_eq!(v.to_str().unwrap(), VERSION);
}

#[test]
fn python_projects_carry_the_cargo_version() {
    let binding = read("bindings/python/pyproject.toml");
    assert_eq!(toml_value(&binding, "project", "name").as_deref(), Some("lumos"), "the binding's distribution name");
    assert_eq!(toml_value(&binding, "project", "version").as_deref(), Some(VERSION), "bindings/python/pyproject.toml");
    let plugin = read("napari-plugin/pyproject.toml");
    assert_eq!(toml_value(&plugin, "project", "version").as_deref(), Some(VERSION), "napari-plugin/pyproject.toml");
    let deps = toml_value(&plugin, "project", "dependencies").unwrap_or_default();
    assert!(deps.contains(&format!("\"lumos=={VERSION}\"")), "napari-plugin depends on lumos=={VERSION}: {deps}");
}

#[test]
fn maven_project_carries_the_cargo_version() {
    let pom = read("fiji-plugin/pom.xml");
    // the project's own <version>, the first one after </artifactId> of the project
    let own = pom.split("<artifactId>Lumos_Fiji</artifactId>").nth(1).and_then(|r| r.split("<version>").nth(1));
    let own = own.and_then(|r| r.split("</version>").next()).unwrap_or("");
    assert_eq!(own, VERSION, "fiji-plugin/pom.xml");
}

#[test]
fn changelog_has_an_entry_for_the_version() {
    let log = read("CHANGELOG.md");
    assert!(
        log.lines()
            .any(|l| l.starts_with("## ")
                && (l.contains(&format!("[{VERSION}]")) || l.contains(&format!(" {VERSION} ")))),
        "CHANGELOG.md has no '## [{VERSION}] ...' heading"
    );
}
