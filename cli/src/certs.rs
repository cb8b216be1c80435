//! `moectl gen-certs`: a cluster CA and one node certificate (server and client use) signed by
//! it, for `--tls-cert/--tls-key/--tls-ca`. Enough for a lab or a test; production clusters
//! usually take certificates from their own PKI (cert-manager, Vault), in the same PEM files.

use std::path::PathBuf;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

#[derive(clap::Args)]
pub struct Args {
    /// Directory to write `ca.pem`, `node.pem` and `node.key` into.
    #[arg(long)]
    out: PathBuf,
    /// Names and IP addresses the node certificate is valid for, besides localhost and
    /// 127.0.0.1 (comma-separated: the addresses components reach each other at).
    #[arg(long, value_delimiter = ',')]
    san: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name.push(DnType::CommonName, "hunyuan-moe cluster CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;

    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    names.extend(args.san.iter().filter(|s| !s.is_empty()).cloned());
    let mut node = CertificateParams::new(names.clone()).context("subject alternative names")?;
    node.distinguished_name = DistinguishedName::new();
    node.distinguished_name.push(DnType::CommonName, "hunyuan-moe node");
    node.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate()?;
    let cert = node.signed_by(&key, &ca)?;

    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let write = |name: &str, text: &str| -> anyhow::Result<()> {
        let path = args.out.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("ca.pem", &ca.pem())?;
    write("node.pem", &cert.pem())?;
    write("node.key", &key.serialize_pem())?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(args.out.join("node.key"), std::fs::Permissions::from_mode(0o600))?;
    eprintln!(
        "wrote ca.pem, node.pem, node.key to {} (node valid for {})",
        args.out.display(),
        names.join(", ")
    );
    Ok(())
}
