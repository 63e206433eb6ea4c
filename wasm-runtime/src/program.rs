//! Linking: a compiled module or component becomes a [`Program`], linked against the WASI (and
//! wasi:http) linkers and pre-instantiated once (`InstancePre`, `CommandPre`, `ProxyPre`), so that
//! a start is an instantiation, not a link. Also decides what a component is for (command or
//! HTTP handler) from its exports.

use std::fmt;
use std::sync::Arc;

use wasmtime::component::Component;
use wasmtime::{Engine, ExternType, InstancePre, Module};
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi_http::p2::bindings::ProxyPre;

use crate::cache::Artifact;
use crate::wasi::{ComponentState, StoreState};
use crate::{Error, ProgramKind, WasmHost, one_line};

/// A compiled, linked, pre-instantiated program ready to be started cheaply. Cloning is cheap.
#[derive(Clone)]
pub struct Program {
    pub(crate) inner: Arc<ProgramInner>,
}

pub(crate) struct ProgramInner {
    pub(crate) digest: String,
    pub(crate) engine: Engine,
    pub(crate) pre: Pre,
}

pub(crate) enum Pre {
    Module(InstancePre<StoreState>),
    Command(CommandPre<ComponentState>),
    Http(ProxyPre<ComponentState>),
}

impl Program {
    /// The content digest (`sha256:<hex>`) this program was loaded under.
    pub fn digest(&self) -> &str {
        &self.inner.digest
    }

    /// Module or component.
    pub fn kind(&self) -> ProgramKind {
        match self.inner.pre {
            Pre::Module(_) => ProgramKind::Module,
            Pre::Command(_) | Pre::Http(_) => ProgramKind::Component,
        }
    }

    /// Whether this is a component exporting `wasi:http/incoming-handler` (serve it with
    /// [`WasmHost::serve_http`]; [`WasmHost::run`] refuses it).
    pub fn is_http(&self) -> bool {
        matches!(self.inner.pre, Pre::Http(_))
    }
}

impl fmt::Debug for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Program")
            .field("digest", &self.inner.digest)
            .field("kind", &self.kind())
            .field("is_http", &self.is_http())
            .finish_non_exhaustive()
    }
}

impl WasmHost {
    pub(crate) fn link(&self, digest: &str, artifact: &Artifact) -> Result<Program, Error> {
        let pre = match artifact {
            Artifact::Module(module) => Pre::Module(self.link_module(digest, module)?),
            Artifact::Component(component) => self.link_component(digest, component)?,
        };
        Ok(Program {
            inner: Arc::new(ProgramInner { digest: digest.to_string(), engine: self.inner.engine.clone(), pre }),
        })
    }

    fn link_module(&self, digest: &str, module: &Module) -> Result<InstancePre<StoreState>, Error> {
        match module.get_export("_start") {
            None => {
                return Err(Error::MissingStart { digest: digest.to_string() });
            }
            Some(ExternType::Func(ty)) if ty.params().len() == 0 && ty.results().len() == 0 => {}
            Some(other) => {
                return Err(Error::BadStart { digest: digest.to_string(), found: describe_extern(&other) });
            }
        }
        self.inner.linker.instantiate_pre(module).map_err(|e| Error::Link {
            kind: ProgramKind::Module,
            digest: digest.to_string(),
            reason: one_line(&e),
        })
    }

    fn link_component(&self, digest: &str, component: &Component) -> Result<Pre, Error> {
        let engine = &self.inner.engine;
        let ty = component.component_type();
        let exports: Vec<&str> = ty.exports(engine).map(|(name, _)| name).collect();
        let exports_interface = |iface: &str| {
            exports.iter().any(|name| name.split_once('@').map_or(*name, |(unversioned, _)| unversioned) == iface)
        };
        let http = exports_interface("wasi:http/incoming-handler");
        let cli = exports_interface("wasi:cli/run");
        if !http && !cli {
            let exports = if exports.is_empty() { "nothing".to_string() } else { exports.join(", ") };
            return Err(Error::NotRunnable { digest: digest.to_string(), exports });
        }
        let link_error = |e: wasmtime::Error| Error::Link {
            kind: ProgramKind::Component,
            digest: digest.to_string(),
            reason: one_line(&e),
        };
        let pre = self.inner.component_linker.instantiate_pre(component).map_err(link_error)?;
        if http {
            Ok(Pre::Http(ProxyPre::new(pre).map_err(link_error)?))
        } else {
            Ok(Pre::Command(CommandPre::new(pre).map_err(link_error)?))
        }
    }

    pub(crate) fn check_program(&self, program: &Program) -> Result<(), Error> {
        if !Engine::same(&program.inner.engine, &self.inner.engine) {
            return Err(Error::ForeignProgram { digest: program.digest().to_string() });
        }
        Ok(())
    }
}

fn describe_extern(ty: &ExternType) -> String {
    match ty {
        ExternType::Func(f) => format!("a function with {} params and {} results", f.params().len(), f.results().len()),
        ExternType::Global(_) => "a global".into(),
        ExternType::Table(_) => "a table".into(),
        ExternType::Memory(_) => "a memory".into(),
        ExternType::Tag(_) => "a tag".into(),
    }
}
