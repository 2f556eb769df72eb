//! libnftables, the library behind the `nft` command (Debian package
//! `libnftables1`), loaded at run time and kept open: one context, one
//! netlink socket, commands in nft's own syntax in, text (or JSON) out.
//!
//! ```text
//!  Nft::open ─ dlopen("libnftables.so.1") ─ nft_ctx_new ─ buffer output and errors
//!  Nft::run(text) ─ nft_run_cmd_from_buffer ─▶ Ok(output) │ Err(Refused { what nft said })
//!                   (every command of the text is one netlink batch: one transaction)
//! ```
//!
//! Why a binding and not `nft -f`: a process start and exit costs about
//! 15 ms per call, and before element commands nft 1.0.6 dumps the
//! table's chains and sets; a context kept open in-process changed one
//! endpoint at 10,000 Services in 0.24 ms end to end (BENCHMARKS.md). The
//! Rust crates that speak nf_tables netlink (`rustables`, `nftnl`) cannot
//! express numgen-keyed concatenated maps.
//!
//! Loading at run time (rather than linking) keeps `libnftables-dev` out
//! of the build: a node without `libnftables1` fails at `Nft::open` with
//! the loader's message, not at start-up of every other data plane.
//!
//! Memory: parsing a full sync's text (about 220,000 elements at 10,000
//! Services) peaks at some 600 MiB inside libnftables; it frees all of it,
//! but glibc keeps the freed pages, so the agent stayed at that peak. After
//! a large command text [`Nft::run`] calls glibc's `malloc_trim`
//! (`switchyard_heap::trim`), which gives them back: 268 -> 27 MiB after
//! 100,000 elements in a test process.
//!
//! This module and `switchyard-heap` are the only places in the workspace
//! with `unsafe` code. The
//! contract it relies on (libnftables.h): a context is used by one thread
//! at a time (`run` takes `&mut self`); the buffers returned by
//! `nft_ctx_get_{output,error}_buffer` are NUL-terminated, owned by the
//! context and valid until the next command; the library stays loaded as
//! long as the context (the `Library` is dropped after `nft_ctx_free`).

#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};

use libloading::Library;

/// The shared object Debian's `libnftables1` installs.
pub const LIBRARY: &str = "libnftables.so.1";

/// `NFT_CTX_OUTPUT_JSON`: listings in JSON.
pub const OUTPUT_JSON: u32 = 1 << 4;
/// `NFT_CTX_OUTPUT_NUMERIC_ALL`: numbers for protocols, services, priorities.
pub const OUTPUT_NUMERIC_ALL: u32 = (1 << 6) | (1 << 7) | (1 << 8) | (1 << 9);

/// Why libnftables could not be used or refused a command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The library or one of its symbols could not be loaded.
    #[error("loading {LIBRARY} (Debian package libnftables1)")]
    Load(#[source] libloading::Error),
    /// `nft_ctx_new` returned nothing.
    #[error("nft_ctx_new failed")]
    Context,
    /// The command text holds a NUL byte.
    #[error("command text holds a NUL byte at {0}")]
    Nul(usize),
    /// nft refused the commands (parse error or kernel NACK); nothing of
    /// the batch was applied.
    #[error("nft refused the commands: {0}")]
    Refused(String),
}

type CtxNew = unsafe extern "C" fn(c_uint) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type CtxInt = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxStr = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type CtxFlags = unsafe extern "C" fn(*mut c_void, c_uint);
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

/// Command texts at least this long are followed by `malloc_trim` (a
/// one-endpoint change is well under 1 KiB, a full sync of 1,000 Services
/// about 5 MiB).
pub const TRIM_AFTER_BYTES: usize = 1 << 20;

/// One libnftables context, kept open.
pub struct Nft {
    ctx: *mut c_void,
    free: CtxFree,
    output: CtxStr,
    error: CtxStr,
    flags: CtxFlags,
    run_cmd: RunCmd,
    // Dropped last: every function pointer above points into it.
    _lib: Library,
}

impl std::fmt::Debug for Nft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nft").finish_non_exhaustive()
    }
}

// SAFETY: the context is plain heap state of the library, not tied to the
// thread that created it; `run` and `set_output_flags` take `&mut self`, so
// it is used by one thread at a time as libnftables requires.
unsafe impl Send for Nft {}

fn symbol<T: Copy>(lib: &Library, name: &[u8]) -> Result<T, Error> {
    // SAFETY: every `T` used below is the exact C signature of `name` in
    // libnftables.h (1.0.x); the pointer is only called while `lib` lives.
    unsafe { lib.get::<T>(name).map(|s| *s).map_err(Error::Load) }
}

impl Nft {
    /// Loads the library and opens a context whose output and errors are
    /// buffered (returned by [`Nft::run`], never printed).
    pub fn open() -> Result<Self, Error> {
        // SAFETY: loading libnftables runs its initialisers, which only set
        // up its own state (no global process state is changed).
        let lib = unsafe { Library::new(LIBRARY) }.map_err(Error::Load)?;
        let new: CtxNew = symbol(&lib, b"nft_ctx_new\0")?;
        let free: CtxFree = symbol(&lib, b"nft_ctx_free\0")?;
        let buffer_output: CtxInt = symbol(&lib, b"nft_ctx_buffer_output\0")?;
        let buffer_error: CtxInt = symbol(&lib, b"nft_ctx_buffer_error\0")?;
        let output: CtxStr = symbol(&lib, b"nft_ctx_get_output_buffer\0")?;
        let error: CtxStr = symbol(&lib, b"nft_ctx_get_error_buffer\0")?;
        let flags: CtxFlags = symbol(&lib, b"nft_ctx_output_set_flags\0")?;
        let run_cmd: RunCmd = symbol(&lib, b"nft_run_cmd_from_buffer\0")?;
        // SAFETY: NFT_CTX_DEFAULT (0) is the documented flag value.
        let ctx = unsafe { new(0) };
        if ctx.is_null() {
            return Err(Error::Context);
        }
        // SAFETY: `ctx` is a live context from `nft_ctx_new`.
        unsafe {
            buffer_output(ctx);
            buffer_error(ctx);
        }
        Ok(Self {
            ctx,
            free,
            output,
            error,
            flags,
            run_cmd,
            _lib: lib,
        })
    }

    /// Sets the output flags ([`OUTPUT_JSON`], [`OUTPUT_NUMERIC_ALL`]) for
    /// the commands that follow.
    pub fn set_output_flags(&mut self, flags: u32) {
        // SAFETY: `self.ctx` is live; any flag combination is accepted.
        unsafe { (self.flags)(self.ctx, flags) }
    }

    /// Runs `commands` (nft syntax, one or more lines) as one batch: the
    /// kernel applies all of it or none. Returns what nft printed.
    pub fn run(&mut self, commands: &str) -> Result<String, Error> {
        let text = CString::new(commands).map_err(|e| Error::Nul(e.nul_position()))?;
        // SAFETY: `self.ctx` is live and used by this thread only (`&mut`);
        // `text` is NUL-terminated and outlives the call.
        let rc = unsafe { (self.run_cmd)(self.ctx, text.as_ptr()) };
        let output = buffer(self.output, self.ctx);
        if commands.len() >= TRIM_AFTER_BYTES {
            switchyard_heap::trim();
        }
        if rc == 0 {
            return Ok(output);
        }
        Err(Error::Refused(
            buffer(self.error, self.ctx).trim().to_owned(),
        ))
    }
}

/// Copies a context's output or error buffer (and so empties it for the
/// next command).
fn buffer(get: CtxStr, ctx: *mut c_void) -> String {
    // SAFETY: `ctx` is live; the buffer functions return NULL or a
    // NUL-terminated string owned by the context, valid until the next call
    // on it, and it is copied before that.
    unsafe {
        let p = get(ctx);
        if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

impl Drop for Nft {
    fn drop(&mut self) {
        // SAFETY: `self.ctx` came from `nft_ctx_new` and is freed once;
        // the library is still loaded (`_lib` drops after this).
        unsafe { (self.free)(self.ctx) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs libnftables1; a parse error never reaches the kernel, so this
    /// runs without privileges.
    #[test]
    fn a_parse_error_is_refused_with_nfts_message() {
        let Ok(mut nft) = Nft::open() else {
            eprintln!("skipping: {LIBRARY} is not installed");
            return;
        };
        let err = nft.run("add tabel ip nope").expect_err("a typo");
        assert!(
            matches!(&err, Error::Refused(m) if m.contains("syntax error")),
            "{err}"
        );
        assert!(matches!(nft.run("a\0b"), Err(Error::Nul(1))));
    }
}
