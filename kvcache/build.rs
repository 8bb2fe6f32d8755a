//! With the `cuda` feature: compiles `cuda/paged_attention.cu` to PTX for the GPU generation
//! named by `CUDA_COMPUTE_CAP` (default 90, H100/H200; there may be no GPU here to ask), with
//! the `nvcc` named by `NVCC`, found under `CUDA_HOME`, or on the `PATH`
//! (`scripts/install-cuda.sh` installs one from PyPI). Without the feature it does nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=cuda/paged_attention.cu");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| {
        println!("cargo::warning=CUDA_COMPUTE_CAP is not set: compiling the paged-attention kernel for sm_90 (H100/H200)");
        "90".into()
    });
    let cap: u32 = cap
        .trim()
        .trim_start_matches("sm_")
        .replace('.', "")
        .parse()
        .unwrap_or_else(|_| {
            panic!("CUDA_COMPUTE_CAP={cap:?} is not a compute capability such as 90")
        });
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("CUDA_HOME")
                .map(|h| PathBuf::from(h).join("bin/nvcc"))
                .filter(|p| p.exists())
        })
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("paged_attention.ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=sm_{cap}")])
        .arg("cuda/paged_attention.cu")
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "running {} failed ({e}): the cuda feature needs nvcc (scripts/install-cuda.sh, then `source target/cuda-venv/env.sh`)",
                nvcc.display()
            )
        });
    assert!(
        status.success(),
        "nvcc failed on cuda/paged_attention.cu ({status})"
    );
}
