//! oneDNN's matmul primitive — the CPU kernel library PyTorch uses — for
//! bf16 products on the matrix units (AMX-BF16, AVX512-BF16) with fp32
//! accumulation, and fp32 where asked. It is loaded at run time
//! (`libdnnl.so.2`, Debian's `libdnnl2`; oneDNN 2.x's C API) so that a
//! build needs nothing installed; without it the built-in kernels run.
//!
//! One product is one oneDNN call on as many threads as rayon has (its
//! OpenMP team; one thread when called from a rayon task, whose loop owns
//! the threads), so the second factor is packed for the matrix units once.
//! Primitives are created per shape and cached; so that expert products,
//! whose row counts change every step, reuse them, the rows (the summed
//! rows of a weight gradient) run as a multiple of 64 and a tail of fewer
//! than 64 padded with zeros to 64.

use super::{Bf16, Dest, Operand, Values};
use libloading::Library;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr};
use std::sync::{Arc, Mutex, OnceLock};

/// Row counts run as multiples of this (the tail padded to it).
pub const ROWS_ALIGN: usize = 64;

/// Products below this many multiply-adds run on the calling thread alone.
const SMALL_MACS: usize = 1 << 22;

/// Primitives kept at most (they hold JIT-compiled code); past it the
/// cache starts over.
const MAX_PRIMITIVES: usize = 512;

type Status = i32;
type Dim = i64;
type Handle = *mut c_void;
const SUCCESS: Status = 0;
const F32: i32 = 3;
const BF16: i32 = 2;
const ENGINE_CPU: i32 = 1;
const ARG_SRC: i32 = 1;
const ARG_DST: i32 = 17;
const ARG_WEIGHTS: i32 = 33;
const ARG_SCRATCHPAD: i32 = 80;
const STREAM_DEFAULT: u32 = 1;
const SCRATCHPAD_USER: i32 = 1;
const QUERY_IMPL_INFO: i32 = 8;
const QUERY_SCRATCHPAD_MD: i32 = 136;
const U8: i32 = 6;
/// The scratchpad's alignment (oneDNN's page-free minimum is 64 bytes).
const SCRATCH_ALIGN: usize = 64;
const ISA_AMX: i32 = 0x3e7;
const ISA_AVX512_BF16: i32 = 0xe7;

/// Room for oneDNN 2.x's `dnnl_memory_desc_t` (696 bytes in 2.6), which the
/// C API only takes by pointer.
#[repr(C, align(16))]
struct MemoryDesc([u8; 4096]);

/// Room for `dnnl_matmul_desc_t` (2,800 bytes in 2.6).
#[repr(C, align(16))]
struct MatmulDesc([u8; 8192]);

#[repr(C)]
struct ExecArg {
    arg: i32,
    memory: Handle,
}

#[repr(C)]
struct Version {
    major: i32,
    minor: i32,
    patch: i32,
    hash: *const c_char,
}

/// The C functions used, resolved once.
struct Api {
    memory_desc_init_by_strides: unsafe extern "C" fn(*mut MemoryDesc, i32, *const Dim, i32, *const Dim) -> Status,
    memory_desc_get_size: unsafe extern "C" fn(*const MemoryDesc) -> usize,
    matmul_desc_init: unsafe extern "C" fn(
        *mut MatmulDesc,
        *const MemoryDesc,
        *const MemoryDesc,
        *const MemoryDesc,
        *const MemoryDesc,
    ) -> Status,
    primitive_attr_create: unsafe extern "C" fn(*mut Handle) -> Status,
    primitive_attr_destroy: unsafe extern "C" fn(Handle) -> Status,
    primitive_attr_set_scratchpad_mode: unsafe extern "C" fn(Handle, i32) -> Status,
    primitive_attr_set_post_ops: unsafe extern "C" fn(Handle, Handle) -> Status,
    post_ops_create: unsafe extern "C" fn(*mut Handle) -> Status,
    post_ops_append_sum: unsafe extern "C" fn(Handle, f32) -> Status,
    post_ops_destroy: unsafe extern "C" fn(Handle) -> Status,
    primitive_desc_create: unsafe extern "C" fn(*mut Handle, *const MatmulDesc, Handle, Handle, Handle) -> Status,
    primitive_desc_query: unsafe extern "C" fn(Handle, i32, i32, *mut c_void) -> Status,
    primitive_desc_query_md: unsafe extern "C" fn(Handle, i32, i32) -> *const MemoryDesc,
    primitive_desc_destroy: unsafe extern "C" fn(Handle) -> Status,
    primitive_create: unsafe extern "C" fn(*mut Handle, Handle) -> Status,
    primitive_destroy: unsafe extern "C" fn(Handle) -> Status,
    primitive_execute: unsafe extern "C" fn(Handle, Handle, i32, *const ExecArg) -> Status,
    memory_create: unsafe extern "C" fn(*mut Handle, *const MemoryDesc, Handle, *mut c_void) -> Status,
    memory_destroy: unsafe extern "C" fn(Handle) -> Status,
    engine_create: unsafe extern "C" fn(*mut Handle, i32, usize) -> Status,
    stream_create: unsafe extern "C" fn(*mut Handle, Handle, u32) -> Status,
    stream_wait: unsafe extern "C" fn(Handle) -> Status,
    get_effective_cpu_isa: unsafe extern "C" fn() -> i32,
    version: unsafe extern "C" fn() -> *const Version,
    omp_set_num_threads: unsafe extern "C" fn(i32),
}

/// One product shape: element type, which factors are read transposed,
/// sizes, leading dimensions, and whether it adds to C.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Shape {
    bf16: bool,
    a_trans: bool,
    b_trans: bool,
    m: usize,
    k: usize,
    n: usize,
    lda: usize,
    ldb: usize,
    ldc: usize,
    accumulate: bool,
}

/// A created primitive, its operands' and scratchpad's descriptors, and
/// the implementation oneDNN chose for it.
struct Primitive {
    primitive: Handle,
    scratch_bytes: usize,
    /// A, B, C and the scratchpad (a plain byte buffer).
    descs: [Box<MemoryDesc>; 4],
    implementation: String,
    /// `dnnl_primitive_destroy`, run when the cache lets the primitive go
    /// (it holds JIT-compiled code).
    destroy: unsafe extern "C" fn(Handle) -> Status,
}

impl Drop for Primitive {
    fn drop(&mut self) {
        // SAFETY: the last reference is gone; nothing executes it any more.
        unsafe { (self.destroy)(self.primitive) };
    }
}

// SAFETY: oneDNN primitives may be executed from several threads at once
// (each execution here brings its own stream, memory objects and
// scratchpad: the user scratchpad mode); the handles are never mutated.
unsafe impl Send for Primitive {}
unsafe impl Sync for Primitive {}

/// The loaded library.
pub struct OneDnn {
    api: Api,
    engine: Handle,
    primitives: Mutex<HashMap<Shape, Arc<Primitive>>>,
    /// "oneDNN 2.6.3 (AMX-BF16)".
    description: String,
    /// Why bf16 products cannot run here, if they cannot: on an AVX2-only
    /// AMD EPYC oneDNN 2.6.3 refused to create any bf16 matmul.
    no_bf16: Option<String>,
    _library: Library,
}

// SAFETY: the engine is created once and only read; the cache is locked.
unsafe impl Send for OneDnn {}
unsafe impl Sync for OneDnn {}

thread_local! {
    /// This thread's stream (oneDNN streams are not shared between threads).
    static STREAM: Cell<Handle> = const { Cell::new(std::ptr::null_mut()) };
    /// The OpenMP team size last set on this thread.
    static TEAM: Cell<i32> = const { Cell::new(0) };
    /// This thread's scratchpad.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// This thread's converted copies of a product's two factors, kept
    /// between products (fresh large buffers cost a page fault per 4 KiB).
    static FACTORS: RefCell<(Converted, Converted)> = const { RefCell::new((Converted::new(), Converted::new())) };
}

static LOADED: OnceLock<Result<OneDnn, String>> = OnceLock::new();

/// The library names tried, newest first.
const NAMES: [&str; 1] = ["libdnnl.so.2"];

/// oneDNN, loaded on first use; why not, when it cannot be.
pub fn get() -> Result<&'static OneDnn, &'static str> {
    LOADED.get_or_init(load).as_ref().map_err(String::as_str)
}

fn load() -> Result<OneDnn, String> {
    let mut tried = Vec::new();
    for name in NAMES {
        // SAFETY: loading a shared library runs its initialisers; oneDNN's
        // only set up its CPU dispatcher.
        match unsafe { Library::new(name) } {
            Ok(library) => return OneDnn::open(library),
            Err(e) => tried.push(format!("{name}: {e}")),
        }
    }
    Err(format!("oneDNN is not installed ({}): apt-get install libdnnl2", tried.join("; ")))
}

macro_rules! symbols {
    ($lib:expr, { $($field:ident = $name:literal),* $(,)? }) => {
        Api { $($field: {
            // SAFETY: each symbol is declared with its C signature from
            // oneDNN 2.x's dnnl.h (and libgomp's omp.h).
            let symbol = unsafe { $lib.get($name) }.map_err(|e| format!("oneDNN lacks {}: {e}", stringify!($field)))?;
            *symbol
        }),* }
    };
}

fn check(status: Status, what: &str) -> Result<(), String> {
    if status == SUCCESS {
        Ok(())
    } else {
        Err(format!("oneDNN {what} failed (status {status})"))
    }
}

impl OneDnn {
    fn open(library: Library) -> Result<Self, String> {
        let api = symbols!(library, {
            memory_desc_init_by_strides = b"dnnl_memory_desc_init_by_strides\0",
            memory_desc_get_size = b"dnnl_memory_desc_get_size\0",
            matmul_desc_init = b"dnnl_matmul_desc_init\0",
            primitive_attr_create = b"dnnl_primitive_attr_create\0",
            primitive_attr_destroy = b"dnnl_primitive_attr_destroy\0",
            primitive_attr_set_scratchpad_mode = b"dnnl_primitive_attr_set_scratchpad_mode\0",
            primitive_attr_set_post_ops = b"dnnl_primitive_attr_set_post_ops\0",
            post_ops_create = b"dnnl_post_ops_create\0",
            post_ops_append_sum = b"dnnl_post_ops_append_sum\0",
            post_ops_destroy = b"dnnl_post_ops_destroy\0",
            primitive_desc_create = b"dnnl_primitive_desc_create\0",
            primitive_desc_query = b"dnnl_primitive_desc_query\0",
            primitive_desc_query_md = b"dnnl_primitive_desc_query_md\0",
            primitive_desc_destroy = b"dnnl_primitive_desc_destroy\0",
            primitive_create = b"dnnl_primitive_create\0",
            primitive_destroy = b"dnnl_primitive_destroy\0",
            primitive_execute = b"dnnl_primitive_execute\0",
            memory_create = b"dnnl_memory_create\0",
            memory_destroy = b"dnnl_memory_destroy\0",
            engine_create = b"dnnl_engine_create\0",
            stream_create = b"dnnl_stream_create\0",
            stream_wait = b"dnnl_stream_wait\0",
            get_effective_cpu_isa = b"dnnl_get_effective_cpu_isa\0",
            version = b"dnnl_version\0",
            omp_set_num_threads = b"omp_set_num_threads\0",
        });
        let mut engine = std::ptr::null_mut();
        // SAFETY: the out-pointer is valid; engine 0 of the CPU kind always exists.
        check(unsafe { (api.engine_create)(&mut engine, ENGINE_CPU, 0) }, "engine creation")?;
        // SAFETY: dnnl_version returns a pointer to a static struct.
        let version = unsafe { &*(api.version)() };
        if version.major != 2 {
            return Err(format!("oneDNN {}.{} is not the 2.x this build speaks", version.major, version.minor));
        }
        // SAFETY: a plain query.
        let isa = unsafe { (api.get_effective_cpu_isa)() };
        let units = match isa {
            ISA_AMX => "AMX-BF16",
            ISA_AVX512_BF16 => "AVX512-BF16",
            _ => "no bf16 matrix units",
        };
        let description = format!("oneDNN {}.{}.{} ({units})", version.major, version.minor, version.patch);
        let mut library =
            Self { api, engine, primitives: Mutex::new(HashMap::new()), description, no_bf16: None, _library: library };
        // Asked once, by creating (and dropping) one small bf16 product, so
        // that bf16 can fall back to the built-in kernels instead of
        // failing mid-step.
        let n = ROWS_ALIGN;
        let probe = Shape {
            bf16: true,
            a_trans: false,
            b_trans: true,
            m: n,
            k: n,
            n,
            lda: n,
            ldb: n,
            ldc: n,
            accumulate: false,
        };
        if library.create(probe).is_err() {
            library.no_bf16 = Some(format!("{} has no bf16 matmul on this CPU", library.description));
        }
        Ok(library)
    }

    /// Whether bf16 products run here; why not, if they do not.
    pub fn bf16(&self) -> Result<(), &str> {
        self.no_bf16.as_deref().map_or(Ok(()), Err)
    }

    /// "oneDNN 2.6.3 (AMX-BF16)".
    pub fn description(&self) -> &str {
        &self.description
    }

    /// `C[m,n] (+)= op(A) op(B)` with bf16 (or fp32) factors, fp32 result.
    /// Sizes are checked, none zero, by the caller.
    pub(super) fn product(
        &self,
        (m, k, n): (usize, usize, usize),
        a: Operand<'_>,
        b: Operand<'_>,
        c: Dest<'_>,
        accumulate: bool,
        bf16: bool,
    ) -> Result<(), String> {
        FACTORS.with(|buffers| {
            // A product inside a product cannot happen; a panic mid-way leaves the buffers free.
            let mut buffers = buffers.try_borrow_mut().map_err(|_| "nested product".to_string())?;
            let (a_buf, b_buf) = &mut *buffers;
            let fa = Factor { bytes: a_buf.bytes(a.values, m * k, bf16), trans: a.transposed, elem: elem_bytes(bf16) };
            let fb = Factor { bytes: b_buf.bytes(b.values, k * n, bf16), trans: b.transposed, elem: elem_bytes(bf16) };
            self.factors_ready((m, k, n), fa, fb, c, accumulate, bf16)
        })
    }

    /// The product of factors in the element type the primitive takes.
    fn factors_ready(
        &self,
        dims: (usize, usize, usize),
        a: Factor<'_>,
        b: Factor<'_>,
        c: Dest<'_>,
        accumulate: bool,
        bf16: bool,
    ) -> Result<(), String> {
        self.set_team(dims.0 * dims.1 * dims.2);
        if a.trans {
            self.weight_gradient(dims, a, b, c, accumulate, bf16)
        } else {
            self.rows(dims, a, b, c, accumulate, bf16)
        }
    }

    /// op(A) = A [m,k] row-major: the aligned rows in one call, then the
    /// tail through a padded copy.
    fn rows(
        &self,
        (m, k, n): (usize, usize, usize),
        a: Factor<'_>,
        b: Factor<'_>,
        mut c: Dest<'_>,
        accumulate: bool,
        bf16: bool,
    ) -> Result<(), String> {
        let ldb = if b.trans { k } else { n };
        let shape =
            |rows| Shape { bf16, a_trans: false, b_trans: b.trans, m: rows, k, n, lda: k, ldb, ldc: n, accumulate };
        let main = m / ROWS_ALIGN * ROWS_ALIGN;
        if main > 0 {
            self.run(shape(main), a.bytes.as_ptr(), b.bytes.as_ptr(), c.as_mut_ptr())?;
        }
        let tail = m - main;
        if tail > 0 {
            let a_pad = a.padded_rows(main..m, k);
            let mut c_pad = vec![0.0f32; ROWS_ALIGN * n];
            if accumulate {
                c.read_into(main * n, &mut c_pad[..tail * n]);
            }
            self.run(shape(ROWS_ALIGN), a_pad.as_ptr(), b.bytes.as_ptr(), c_pad.as_mut_ptr())?;
            c.write(main * n, &c_pad[..tail * n]);
        }
        Ok(())
    }

    /// op(A) = A^T with A stored [k,m] (a weight gradient: the k rows are
    /// summed): the aligned rows in one call, then the tail's rows padded
    /// with zeros (which add nothing) and added.
    fn weight_gradient(
        &self,
        (m, k, n): (usize, usize, usize),
        a: Factor<'_>,
        b: Factor<'_>,
        mut c: Dest<'_>,
        accumulate: bool,
        bf16: bool,
    ) -> Result<(), String> {
        assert!(!b.trans, "a weight gradient's second factor is stored [k,n]");
        let shape = |rows, accumulate| Shape {
            bf16,
            a_trans: true,
            b_trans: false,
            m,
            k: rows,
            n,
            lda: m,
            ldb: n,
            ldc: n,
            accumulate,
        };
        let main = k / ROWS_ALIGN * ROWS_ALIGN;
        if main > 0 {
            self.run(shape(main, accumulate), a.bytes.as_ptr(), b.bytes.as_ptr(), c.as_mut_ptr())?;
        }
        let tail = k - main;
        if tail > 0 {
            let (a_pad, b_pad) = (a.padded_rows(main..k, m), b.padded_rows(main..k, n));
            self.run(shape(ROWS_ALIGN, accumulate || main > 0), a_pad.as_ptr(), b_pad.as_ptr(), c.as_mut_ptr())?;
        }
        Ok(())
    }

    /// Gives this thread's next call an OpenMP team of rayon's threads, or
    /// of one inside a rayon task or for a small product.
    fn set_team(&self, macs: usize) {
        let alone = rayon::current_thread_index().is_some() || macs < SMALL_MACS;
        let team = if alone { 1 } else { rayon::current_num_threads() as i32 };
        TEAM.with(|last| {
            if last.get() != team {
                // SAFETY: sets this thread's OpenMP team size.
                unsafe { (self.api.omp_set_num_threads)(team) };
                last.set(team);
            }
        });
    }

    /// Runs the primitive of `shape` on this thread.
    fn run(&self, shape: Shape, a: *const u8, b: *const u8, c: *mut f32) -> Result<(), String> {
        let primitive = self.primitive(shape)?;
        let api = &self.api;
        let stream = self.stream()?;
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            if scratch.len() < primitive.scratch_bytes + SCRATCH_ALIGN {
                scratch.resize(primitive.scratch_bytes + SCRATCH_ALIGN, 0);
            }
            let offset = scratch.as_ptr().align_offset(SCRATCH_ALIGN);
            let scratch_at = scratch[offset..].as_mut_ptr();
            let handles = [a as *mut c_void, b as *mut c_void, c as *mut c_void, scratch_at as *mut c_void];
            let descs = primitive.descs.each_ref().map(|d| &**d);
            let mut memories = [std::ptr::null_mut(); 4];
            let count = if primitive.scratch_bytes > 0 { 4 } else { 3 };
            let mut result = Ok(());
            for i in 0..count {
                // SAFETY: the descriptor describes the buffer at `handles[i]`,
                // which outlives the execution (waited for below).
                let status = unsafe { (api.memory_create)(&mut memories[i], descs[i], self.engine, handles[i]) };
                if let Err(e) = check(status, "memory creation") {
                    result = Err(e);
                }
            }
            if result.is_ok() {
                let args = [
                    ExecArg { arg: ARG_SRC, memory: memories[0] },
                    ExecArg { arg: ARG_WEIGHTS, memory: memories[1] },
                    ExecArg { arg: ARG_DST, memory: memories[2] },
                    ExecArg { arg: ARG_SCRATCHPAD, memory: memories[3] },
                ];
                // SAFETY: the arguments are the primitive's, created above.
                result = check(
                    unsafe { (api.primitive_execute)(primitive.primitive, stream, count as i32, args.as_ptr()) },
                    "matmul",
                )
                .and_then(|_| check(unsafe { (api.stream_wait)(stream) }, "stream wait"));
            }
            for memory in memories.into_iter().filter(|m| !m.is_null()) {
                // SAFETY: created above, no longer used.
                unsafe { (api.memory_destroy)(memory) };
            }
            result
        })
    }

    /// This thread's stream, created on first use.
    fn stream(&self) -> Result<Handle, String> {
        STREAM.with(|cell| {
            if cell.get().is_null() {
                let mut stream = std::ptr::null_mut();
                // SAFETY: valid out-pointer and engine.
                check(unsafe { (self.api.stream_create)(&mut stream, self.engine, STREAM_DEFAULT) }, "stream")?;
                cell.set(stream);
            }
            Ok(cell.get())
        })
    }

    /// The cached primitive of `shape`, created on first use.
    fn primitive(&self, shape: Shape) -> Result<Arc<Primitive>, String> {
        if let Some(p) = self.primitives.lock().unwrap_or_else(|e| e.into_inner()).get(&shape) {
            return Ok(Arc::clone(p));
        }
        let created = Arc::new(self.create(shape)?);
        let mut cache = self.primitives.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_PRIMITIVES {
            cache.clear();
        }
        Ok(Arc::clone(cache.entry(shape).or_insert(created)))
    }

    fn create(&self, s: Shape) -> Result<Primitive, String> {
        let api = &self.api;
        let elem = if s.bf16 { BF16 } else { F32 };
        // op(A) [m,k], op(B) [k,n], C [m,n], by strides over the stored layouts.
        let a_strides = if s.a_trans { [1, s.lda] } else { [s.lda, 1] };
        let b_strides = if s.b_trans { [1, s.ldb] } else { [s.ldb, 1] };
        let [a, b, c] = [
            self.desc(&[s.m, s.k], &a_strides, elem)?,
            self.desc(&[s.k, s.n], &b_strides, elem)?,
            self.desc(&[s.m, s.n], &[s.ldc, 1], F32)?,
        ];
        let mut matmul = Box::new(MatmulDesc([0; 8192]));
        // SAFETY: descriptors initialised above; no bias.
        check(unsafe { (api.matmul_desc_init)(&mut *matmul, &*a, &*b, std::ptr::null(), &*c) }, "matmul descriptor")?;
        let (mut attr, mut post_ops) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: out-pointers valid; the attribute keeps its own copy of the post-ops.
        unsafe {
            check((api.primitive_attr_create)(&mut attr), "attributes")?;
            check((api.primitive_attr_set_scratchpad_mode)(attr, SCRATCHPAD_USER), "scratchpad mode")?;
            if s.accumulate {
                check((api.post_ops_create)(&mut post_ops), "post-ops")?;
                check((api.post_ops_append_sum)(post_ops, 1.0), "sum post-op")?;
                check((api.primitive_attr_set_post_ops)(attr, post_ops), "post-ops")?;
                (api.post_ops_destroy)(post_ops);
            }
        }
        let mut pd = std::ptr::null_mut();
        // SAFETY: the descriptor and attributes are valid.
        let created =
            unsafe { (api.primitive_desc_create)(&mut pd, &*matmul, attr, self.engine, std::ptr::null_mut()) };
        // SAFETY: no longer needed.
        unsafe { (api.primitive_attr_destroy)(attr) };
        check(created, &format!("matmul of {s:?}"))?;
        // SAFETY: `pd` is a valid primitive descriptor; what the queries
        // return lives as long as `pd` and is read before it goes.
        let (scratch_bytes, implementation) = unsafe {
            let md = (api.primitive_desc_query_md)(pd, QUERY_SCRATCHPAD_MD, 0);
            let bytes = if md.is_null() { 0 } else { (api.memory_desc_get_size)(md) };
            let mut info: *const c_char = std::ptr::null();
            let status = (api.primitive_desc_query)(pd, QUERY_IMPL_INFO, 0, &mut info as *mut _ as *mut c_void);
            let name = if status == SUCCESS && !info.is_null() {
                CStr::from_ptr(info).to_string_lossy().into_owned()
            } else {
                "?".to_string()
            };
            (bytes, name)
        };
        let mut primitive = std::ptr::null_mut();
        // SAFETY: valid primitive descriptor.
        let made = unsafe { (api.primitive_create)(&mut primitive, pd) };
        // SAFETY: the primitive keeps what it needs.
        unsafe { (api.primitive_desc_destroy)(pd) };
        check(made, "primitive")?;
        // The scratchpad is a plain byte buffer (its descriptor's layout).
        let scratch = self.desc(&[scratch_bytes.max(1)], &[1], U8)?;
        let destroy = api.primitive_destroy;
        Ok(Primitive { primitive, scratch_bytes, descs: [a, b, c, scratch], implementation, destroy })
    }

    /// A memory descriptor of `dims` with `strides` (in elements).
    fn desc(&self, dims: &[usize], strides: &[usize], dtype: i32) -> Result<Box<MemoryDesc>, String> {
        let mut md = Box::new(MemoryDesc([0; 4096]));
        let (mut d, mut st) = ([0i64; 12], [0i64; 12]);
        for (i, (&dim, &stride)) in dims.iter().zip(strides).enumerate() {
            (d[i], st[i]) = (dim as i64, stride as i64);
        }
        // SAFETY: `md` has room for the struct; dims and strides hold 12 entries.
        let status = unsafe {
            (self.api.memory_desc_init_by_strides)(&mut *md, dims.len() as i32, d.as_ptr(), dtype, st.as_ptr())
        };
        check(status, "memory descriptor")?;
        Ok(md)
    }

    /// The implementation oneDNN runs a product with (e.g.
    /// `brg:avx512_core_amx_bf16`), for `C[m,n] = A[m,k] B[n,k]^T`.
    pub fn implementation(&self, m: usize, k: usize, n: usize, bf16: bool) -> Result<String, String> {
        let m = (m / ROWS_ALIGN * ROWS_ALIGN).max(ROWS_ALIGN);
        let shape = Shape { bf16, a_trans: false, b_trans: true, m, k, n, lda: k, ldb: k, ldc: n, accumulate: false };
        Ok(self.primitive(shape)?.implementation.clone())
    }
}

/// A factor's stored values as bytes, and how to read them.
#[derive(Clone, Copy)]
struct Factor<'a> {
    bytes: &'a [u8],
    trans: bool,
    elem: usize,
}

impl Factor<'_> {
    /// Stored rows `rows` (of `width` values), then zero rows up to
    /// [`ROWS_ALIGN`]: a tail run as a full block (zeros add nothing).
    fn padded_rows(&self, rows: std::ops::Range<usize>, width: usize) -> Vec<u8> {
        let row_bytes = width * self.elem;
        let mut out = vec![0u8; ROWS_ALIGN * row_bytes];
        out[..rows.len() * row_bytes].copy_from_slice(&self.bytes[rows.start * row_bytes..rows.end * row_bytes]);
        out
    }
}

/// Bytes per factor element: bf16 or f32.
fn elem_bytes(bf16: bool) -> usize {
    if bf16 {
        2
    } else {
        4
    }
}

/// A factor converted into the element type the primitive takes, when it
/// is stored in the other one. Grown, never shrunk: a shrink and regrow
/// would zero-fill what the conversion overwrites anyway.
struct Converted {
    bf16: Vec<Bf16>,
    f32: Vec<f32>,
}

impl Converted {
    const fn new() -> Self {
        Self { bf16: Vec::new(), f32: Vec::new() }
    }

    /// The first `len` of `values` as bf16 (`bf16`) or f32 bytes: the
    /// stored bytes where the type matches, else converted here (bf16 to
    /// f32 is exact; a bf16 factor reaches an fp32 product only if the
    /// precision changed after it was prepared).
    fn bytes<'s>(&'s mut self, values: Values<'s>, len: usize, bf16: bool) -> &'s [u8] {
        match (values, bf16) {
            (Values::Bf16(v), true) => bytes_of(&v[..len]),
            (Values::F32(v), false) => bytes_of(&v[..len]),
            (Values::F32(v), true) => {
                grow(&mut self.bf16, len);
                super::bf16::convert(&v[..len], &mut self.bf16[..len]);
                bytes_of(&self.bf16[..len])
            }
            (Values::Bf16(v), false) => {
                grow(&mut self.f32, len);
                self.f32.iter_mut().zip(&v[..len]).for_each(|(x, h)| *x = h.to_f32());
                bytes_of(&self.f32[..len])
            }
        }
    }
}

fn grow<T: Copy + Default>(buffer: &mut Vec<T>, len: usize) {
    if buffer.len() < len {
        buffer.resize(len, T::default());
    }
}

fn bytes_of<T: Copy>(values: &[T]) -> &[u8] {
    // SAFETY: f32 and bf16 (u16) have no padding or invalid byte patterns.
    unsafe { std::slice::from_raw_parts(values.as_ptr() as *const u8, std::mem::size_of_val(values)) }
}
