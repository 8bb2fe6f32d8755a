//! Embeds Swagger UI's assets when `scripts/fetch-swagger-ui.sh` has put them in
//! `openapi/swagger-ui/` (cfg `tandem_swagger_ui`); without them `/docs` says how to get
//! them. Nothing is downloaded here: builds stay offline.

use std::path::Path;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(tandem_swagger_ui)");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../openapi/swagger-ui");
    for f in ["swagger-ui-bundle.js", "swagger-ui.css", "VERSION"] {
        println!("cargo::rerun-if-changed={}", dir.join(f).display());
    }
    println!("cargo::rerun-if-changed={}", dir.display());
    let present = ["swagger-ui-bundle.js", "swagger-ui.css"]
        .iter()
        .all(|f| dir.join(f).is_file());
    if present {
        println!("cargo::rustc-cfg=tandem_swagger_ui");
    }
}
