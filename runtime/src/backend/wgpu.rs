//! The wgpu backend: WGSL kernels from `shaders/` on Vulkan, Metal, DX12 or GL.
//!
//! Dispatches are recorded into one pending command encoder and submitted on
//! [`Backend::read`] / [`Backend::sync`] (or every [`MAX_OPS_PER_SUBMIT`] kernels, to bound
//! the work per submit). Our own uncaptured-error and device-lost handlers turn GPU
//! failures into typed errors; buffer and pipeline creation run inside error scopes so that
//! out-of-memory and validation failures are reported where they happen.

use super::tune::{self, KernelShapes, TuneReport, Tuning};
use super::{Backend, Op, RopeStyle};
use crate::error::{Error, Result};
use crate::quant::WeightType;
use std::collections::HashMap;
use std::prelude::v1::*;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use wgpu::util::DeviceExt;

/// The kernel families, one WGSL file each.
pub const SHADERS: [(&str, &str); 12] = [
    ("matmul", include_str!("../../../shaders/matmul.wgsl")),
    ("quant", include_str!("../../../shaders/quant.wgsl")),
    ("rmsnorm", include_str!("../../../shaders/rmsnorm.wgsl")),
    ("rope", include_str!("../../../shaders/rope.wgsl")),
    ("softmax", include_str!("../../../shaders/softmax.wgsl")),
    (
        "elementwise",
        include_str!("../../../shaders/elementwise.wgsl"),
    ),
    ("attention", include_str!("../../../shaders/attention.wgsl")),
    (
        "attention_sg",
        include_str!("../../../shaders/attention_sg.wgsl"),
    ),
    ("quant_sg", include_str!("../../../shaders/quant_sg.wgsl")),
    ("philox", include_str!("../../../shaders/philox.wgsl")),
    (
        "attention_grad",
        include_str!("../../../shaders/attention_grad.wgsl"),
    ),
    ("optim", include_str!("../../../shaders/optim.wgsl")),
];

/// Kernels recorded before a submit is forced: submitting early lets the device run them
/// while the rest of a step is recorded (on lavapipe 16-64 were alike, 256 was slower).
pub const MAX_OPS_PER_SUBMIT: u32 = 32;

const WG: u32 = 64;

/// Uploaded bytes after which the staging copies are flushed.
const MAX_STAGED_BYTES: u64 = 16 << 20;

/// Tokens from which a quantised product dequantises its weights to f32 scratch first.
const DEQUANT_MATMUL_FROM: u32 = 16;

/// Invocations per `attention_v4` workgroup (one invocation per token and head) beyond a
/// decode step, whose count is tuned per device (see [`super::tune`]).
const ATTENTION_WG: u32 = 64;
/// Tokens per `attention_sg8` workgroup: several subgroups of 8, and enough workgroups for
/// every core in a prompt of a few hundred tokens.
const PREFILL_SG_WG: u32 = 32;
/// Positions per `attention_dsg8` workgroup for a prompt (`sg8t`): a prompt's whole
/// context, in practice, so each (token, kv head) is one pass with no merge.
const PREFILL_CHUNK: u32 = 1 << 20;
/// `cross_entropy`'s workgroup (one per row; matches CE_WG in softmax.wgsl).
const CE_WG: u32 = 64;
/// The uniform copies of x in quant_sg.wgsl (16 bytes X_UNIFORM_VEC4S times): products
/// of up to 4096-element rows read x from them. Every buffer is at least this large.
const X_UNIFORM_BYTES: u64 = 16 << 10;

/// How to choose the adapter. Unset fields fall back to wgpu's environment variables
/// (`WGPU_BACKEND`, `WGPU_ADAPTER_NAME`, `WGPU_POWER_PREF`), then to wgpu's default.
#[derive(Debug, Clone, Default)]
pub struct GpuOptions {
    /// Case-insensitive substring of the adapter name.
    pub adapter_name: Option<String>,
    /// Comma list of backends: vulkan, metal, dx12, gl.
    pub backends: Option<String>,
    /// Refuse an adapter that emulates a GPU on the CPU (llvmpipe, lavapipe, WARP) before
    /// any device is made on it: a caller with its own CPU path would only throw it away.
    pub real_gpu_only: bool,
    /// How kernel shapes are chosen (measured once per adapter and driver, then cached).
    pub tuning: Tuning,
    /// Where the kernel shape cache lives (default: see [`tune`]).
    pub cache_dir: Option<std::path::PathBuf>,
    /// Open the device without subgroup operations, so only the portable kernels run (a
    /// driver whose subgroups misbehave; how a device without them behaves).
    pub without_subgroups: bool,
}

/// What the conformance suite prints about the device.
#[derive(Debug, Clone)]
pub struct AdapterReport {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub driver_info: String,
    pub max_buffer_size: u64,
    pub max_storage_binding: u64,
    pub max_workgroups_per_dim: u32,
    pub max_invocations_per_workgroup: u32,
    pub shader_f16: bool,
    pub subgroups: bool,
}

/// A GPU buffer.
#[derive(Debug)]
pub struct GpuBuffer {
    buf: wgpu::Buffer,
    size: u64,
    /// The same bytes as a texture, made on first use by a kernel shape that reads weights
    /// from textures (`MatvecShape::texture`); `None` inside when they do not fit one.
    texture: OnceLock<Option<wgpu::TextureView>>,
    /// The same rows as a texture, for decode attention reading its keys and values from
    /// textures (`AttentionShape::texture`), made on first such use.
    mirror: Mutex<Mirror>,
}

/// A KV cache buffer's texture copy: one row of texels per cache row. The first `valid`
/// bytes of the buffer are in the texture; a dispatch that may write the buffer sets
/// `valid` to 0 as it is recorded (RopeKv and a fused NormQkvRope then restore the rows
/// before their first position: [`Gpu::keeping_kv_mirrors`]), and attention copies the rows past it before reading, so a decode step
/// copies only its new row. It assumes, as `&mut KvCache` ensures, that one thread at a
/// time records the ops on a cache.
#[derive(Debug, Default)]
enum Mirror {
    #[default]
    Untried,
    /// Rows that are not whole multiples of 256 bytes, too many rows, or no memory: the
    /// kernel reads the buffer.
    Unfit,
    /// Boxed: every buffer has a mirror slot, few hold one.
    Held(Box<KvTexture>),
}

#[derive(Debug)]
struct KvTexture {
    texture: wgpu::Texture,
    view: wgpu::TextureView,
    row_bytes: u32,
    valid: u64,
}

impl GpuBuffer {
    /// The bytes from the start that the mirror holds (0 without one).
    fn mirror_valid(&self) -> u64 {
        match &*lock(&self.mirror) {
            Mirror::Held(m) => m.valid,
            _ => 0,
        }
    }

    /// Records that the mirror holds the buffer's first `bytes` (0: the buffer may have
    /// been written anywhere).
    fn set_mirror_valid(&self, bytes: u64) {
        if let Mirror::Held(m) = &mut *lock(&self.mirror) {
            m.valid = bytes;
        }
    }
}

#[derive(Debug, Default)]
struct Pending {
    encoder: Option<wgpu::CommandEncoder>,
    /// The open compute pass on `encoder`: consecutive dispatches share one pass (wgpu
    /// still orders them by their buffer use), which costs lavapipe less per dispatch than
    /// a pass each. It must end before the encoder is used otherwise.
    pass: Option<wgpu::ComputePass<'static>>,
    ops: u32,
}

impl Pending {
    /// The encoder with no pass open on it.
    fn encoder(&mut self, device: &wgpu::Device) -> &mut wgpu::CommandEncoder {
        self.pass = None;
        self.encoder.get_or_insert_with(|| {
            device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("edgetune"),
            })
        })
    }

    /// The open pass, begun if there is none.
    fn pass(&mut self, device: &wgpu::Device) -> &mut wgpu::ComputePass<'static> {
        let pass = match self.pass.take() {
            Some(pass) => pass,
            None => self
                .encoder(device)
                .begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("edgetune"),
                    timestamp_writes: None,
                })
                .forget_lifetime(),
        };
        self.pass.insert(pass)
    }
}

type PipelineKey = (&'static str, &'static str, Vec<(&'static str, u32)>);

/// The wgpu backend.
#[derive(Debug)]
pub struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    features: wgpu::Features,
    modules: Mutex<HashMap<&'static str, wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<PipelineKey, (wgpu::ComputePipeline, wgpu::BindGroupLayout)>>,
    pending: Mutex<Pending>,
    /// f32 scratch for dequantised weights and chunked attention's partial results, grown
    /// on demand. Queued work reading an older, smaller one keeps that one alive; wgpu
    /// orders the passes that share this one.
    scratch: Mutex<Option<Arc<GpuBuffer>>>,
    /// Held while a pair of dispatches that passes data through the scratch (dequantise
    /// then multiply, attention chunks then their merge) is recorded, so another thread
    /// cannot overwrite the scratch between the two.
    scratch_pair: Mutex<()>,
    /// [`Op::QSwiGlu`]'s gate and up products where no fused kernel takes it, grown on
    /// demand; held while the three calls are recorded.
    swiglu_scratch: Mutex<Option<[Arc<GpuBuffer>; 2]>>,
    /// [`Op::NormMatvec`]'s sum and normed x where no fused kernel takes it; held likewise.
    norm_scratch: Mutex<Option<[Arc<GpuBuffer>; 2]>>,
    /// Bytes written with `upload` since the last submission.
    staged: Mutex<u64>,
    lost: Arc<Mutex<Option<String>>>,
    uncaptured: Arc<Mutex<Option<String>>>,
    shapes: KernelShapes,
    tune: Option<TuneReport>,
    /// One uniform buffer per dispatch slot of a submission, rewritten for each op (a
    /// buffer made per op cost an allocation per dispatch: a decode step makes ~500).
    param_slots: Vec<wgpu::Buffer>,
    /// Bound where a kernel's weight texture goes when it reads the storage buffer instead.
    no_texture: wgpu::TextureView,
    /// Per shader family, the bindings it declares `read_write` (bit n: binding n): a
    /// dispatch binding a buffer there may write it, which stales the buffer's mirror.
    writable: HashMap<&'static str, u32>,
    /// x of the prompt products that read their weights from textures, copied in before
    /// each (grown on demand; held while a copy and its product are recorded).
    x_texture: Mutex<Option<wgpu::Texture>>,
}

/// A weight buffer and its optional scale factors.
type WeightRef<'a> = (&'a GpuBuffer, Option<&'a GpuBuffer>);

/// A one-token product as [`Gpu::matvec_sg8`] takes it: out = dequant(w) x, and with
/// `more` other products of the same x.
struct Matvec<'a> {
    /// x, or with `norm` the addend h of the pending add whose norm is x.
    x: &'a GpuBuffer,
    norm: Option<PendingNorm<'a>>,
    w: WeightRef<'a>,
    more: More<'a>,
    out: &'a GpuBuffer,
    wtype: WeightType,
    k: u32,
    n: u32,
}

/// The products beside `w`'s in one [`Matvec`] dispatch.
enum More<'a> {
    None,
    /// SwiGLU's up weight: out = silu(dequant(w) x) * (dequant(up) x).
    Up(WeightRef<'a>),
    /// k and v of [`Op::NormQkv`] (`w` q's), each of `n` rows, into their own outputs;
    /// with `rope`, [`Op::NormQkvRope`]'s: q and k rotated, k and v into the caches.
    Kv {
        k: WeightRef<'a>,
        v: WeightRef<'a>,
        k_out: &'a GpuBuffer,
        v_out: &'a GpuBuffer,
        n: u32,
        rope: Option<KvRope<'a>>,
    },
}

/// [`Op::NormQkvRope`]'s rotation: the (cos, sin) table, the heads' width and the token's
/// position, which is also the row of the caches its k and v go to.
struct KvRope<'a> {
    table: &'a GpuBuffer,
    head_dim: u32,
    pos: u32,
}

/// [`Op::NormMatvec`]'s residual, norm weight, optional sum and epsilon.
struct PendingNorm<'a> {
    a: &'a GpuBuffer,
    weight: &'a GpuBuffer,
    sum: Option<&'a GpuBuffer>,
    eps: f32,
}

/// Bytes of an op's parameters a reused slot holds; larger ones get their own buffer.
const PARAM_SLOT_BYTES: u64 = 64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked while holding it; the data (caches,
    // flags) stays usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn gpu_err(context: &'static str, e: wgpu::Error) -> Error {
    match e {
        wgpu::Error::OutOfMemory { .. } => Error::OutOfMemory {
            what: context,
            bytes: 0,
        },
        other => Error::Gpu {
            context,
            message: other.to_string(),
        },
    }
}

fn choose_adapter(opts: &GpuOptions) -> Result<(wgpu::Instance, wgpu::Adapter)> {
    let backends = match &opts.backends {
        Some(list) => wgpu::Backends::from_comma_list(list),
        None => wgpu::Backends::from_env().unwrap_or_default(),
    };
    if backends.is_empty() {
        return Err(Error::NoAdapter {
            reason: format!("no known backend in {:?}", opts.backends),
        });
    }
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends;
    let instance = wgpu::Instance::new(desc);
    // wgpu's own WGPU_ADAPTER_NAME helper panics when nothing matches; match by hand instead.
    let wanted = opts
        .adapter_name
        .clone()
        .or_else(|| std::env::var("WGPU_ADAPTER_NAME").ok());
    let adapter =
        match wanted {
            Some(wanted) => {
                let adapters = pollster::block_on(instance.enumerate_adapters(backends));
                let needle = wanted.to_lowercase();
                let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
                adapters
                    .into_iter()
                    .find(|a| a.get_info().name.to_lowercase().contains(&needle))
                    .ok_or(Error::NoMatchingAdapter {
                        wanted,
                        available: names,
                    })?
            }
            None => pollster::block_on(
                instance.request_adapter(&wgpu::RequestAdapterOptions {
                    power_preference: wgpu::PowerPreference::from_env()
                        .unwrap_or(wgpu::PowerPreference::HighPerformance),
                    ..Default::default()
                }),
            )
            .map_err(|e| Error::NoAdapter {
                reason: e.to_string(),
            })?,
        };
    Ok((instance, adapter))
}

impl Gpu {
    /// Opens a device on the chosen adapter with every limit the adapter offers.
    pub fn open(opts: &GpuOptions) -> Result<Gpu> {
        let (_instance, adapter) = choose_adapter(opts)?;
        let info = adapter.get_info();
        if opts.real_gpu_only && info.device_type == wgpu::DeviceType::Cpu {
            return Err(Error::NoAdapter {
                reason: format!("`{}` emulates a GPU on the CPU", info.name),
            });
        }
        let limits = adapter.limits();
        let mut features = adapter.features();
        // The subgroup products also bind their weights and x as read-only storage
        // textures (four per kernel, beside fourteen storage buffers and four uniforms);
        // without those no subgroup kernel is used.
        if opts.without_subgroups || !subgroup_bindings_fit(&adapter, &limits) {
            features.remove(wgpu::Features::SUBGROUP);
        }
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("edgetune"),
            required_features: features & wgpu::Features::SUBGROUP,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::RequestDevice {
            adapter: info.name.clone(),
            reason: e.to_string(),
        })?;
        let lost = Arc::new(Mutex::new(None));
        let uncaptured = Arc::new(Mutex::new(None));
        let lost_flag = Arc::clone(&lost);
        device.set_device_lost_callback(move |reason, message| {
            *lock(&lost_flag) = Some(format!("{reason:?}: {message}"));
        });
        let err_flag = Arc::clone(&uncaptured);
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mut slot = lock(&err_flag);
            if slot.is_none() {
                *slot = Some(e.to_string());
            }
        }));
        debug_!("wgpu adapter: {}", info.name.as_str());
        let mut placeholder = weight_texture_desc(1, 1);
        if !features.contains(wgpu::Features::SUBGROUP) {
            placeholder.usage = wgpu::TextureUsages::TEXTURE_BINDING;
        }
        let no_texture = device
            .create_texture(&placeholder)
            .create_view(&wgpu::TextureViewDescriptor::default());
        let mut gpu = Gpu {
            device,
            queue,
            info,
            limits,
            features,
            modules: Mutex::new(HashMap::new()),
            pipelines: Mutex::new(HashMap::new()),
            pending: Mutex::new(Pending::default()),
            scratch: Mutex::new(None),
            scratch_pair: Mutex::new(()),
            swiglu_scratch: Mutex::new(None),
            norm_scratch: Mutex::new(None),
            staged: Mutex::new(0),
            lost,
            uncaptured,
            shapes: KernelShapes::default(),
            tune: None,
            param_slots: Vec::new(),
            no_texture,
            writable: SHADERS
                .iter()
                .map(|(family, src)| (*family, writable_bindings(src)))
                .collect(),
            x_texture: Mutex::new(None),
        };
        gpu.param_slots = (0..MAX_OPS_PER_SUBMIT)
            .map(|_| {
                gpu.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("params"),
                    size: PARAM_SLOT_BYTES,
                    usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            })
            .collect();
        // A measurement that fails leaves the defaults, which every device runs; a lost
        // device shows on the next op.
        let report = tune::autotune(&mut gpu, &opts.tuning, opts.cache_dir.as_deref())
            .unwrap_or_else(|e| TuneReport {
                shapes: KernelShapes::default(),
                origin: "defaults".into(),
                notes: vec![format!(
                    "measuring kernel shapes failed ({e}); using the defaults"
                )],
            });
        gpu.shapes = report.shapes;
        gpu.tune = Some(report);
        Ok(gpu)
    }

    /// The kernel shapes this device runs with, where they came from, and any notice.
    pub fn tuning(&self) -> Option<&TuneReport> {
        self.tune.as_ref()
    }

    /// Whether every subgroup has exactly 8 invocations (lavapipe on AVX2 and AVX-512
    /// hosts), which the subgroup kernels are written for (`open` also drops subgroups
    /// where read-only storage textures, which those kernels bind, are missing).
    pub(crate) fn subgroups_of_8(&self) -> bool {
        self.features.contains(wgpu::Features::SUBGROUP)
            && self.info.subgroup_min_size == 8
            && self.info.subgroup_max_size == 8
    }

    pub(crate) fn set_shapes(&mut self, shapes: KernelShapes) {
        self.shapes = shapes;
    }

    /// PCI vendor and device ids (zero where the backend does not report them).
    pub(crate) fn vendor_device(&self) -> (u32, u32) {
        (self.info.vendor, self.info.device)
    }

    /// The adapter's identity, limits and features.
    pub fn report(&self) -> AdapterReport {
        AdapterReport {
            name: self.info.name.clone(),
            backend: format!("{:?}", self.info.backend),
            device_type: format!("{:?}", self.info.device_type),
            driver: self.info.driver.clone(),
            driver_info: self.info.driver_info.clone(),
            max_buffer_size: self.limits.max_buffer_size,
            max_storage_binding: self.limits.max_storage_buffer_binding_size,
            max_workgroups_per_dim: self.limits.max_compute_workgroups_per_dimension,
            max_invocations_per_workgroup: self.limits.max_compute_invocations_per_workgroup,
            shader_f16: self.features.contains(wgpu::Features::SHADER_F16),
            subgroups: self.features.contains(wgpu::Features::SUBGROUP),
        }
    }

    /// Destroys the device now, freeing its memory (an app going to the background, or a
    /// test of the device-loss path); every later call returns [`Error::DeviceLost`].
    pub fn destroy(&self) {
        self.device.destroy();
        let mut lost = lock(&self.lost);
        if lost.is_none() {
            *lost = Some("destroyed by the application".into());
        }
    }

    /// A scratch buffer of at least `bytes`.
    fn scratch(&self, bytes: u64) -> Result<Arc<GpuBuffer>> {
        let mut slot = lock(&self.scratch);
        if let Some(buf) = slot.as_ref().filter(|b| b.size >= bytes) {
            return Ok(Arc::clone(buf));
        }
        let buf = Arc::new(self.alloc(bytes, "kernel scratch")?);
        *slot = Some(Arc::clone(&buf));
        Ok(buf)
    }

    /// Fails if the device was lost or an uncaptured error was reported since the last check.
    fn check_health(&self) -> Result<()> {
        if let Some(reason) = lock(&self.lost).clone() {
            return Err(Error::DeviceLost { reason });
        }
        if let Some(message) = lock(&self.uncaptured).take() {
            return Err(Error::Gpu {
                context: "queued work",
                message,
            });
        }
        Ok(())
    }

    /// Runs `create` inside out-of-memory and validation error scopes.
    fn scoped<T>(&self, context: &'static str, create: impl FnOnce() -> T) -> Result<T> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let value = create();
        let v_err = pollster::block_on(validation.pop());
        let o_err = pollster::block_on(oom.pop());
        match o_err.or(v_err) {
            Some(e) => Err(gpu_err(context, e)),
            None => Ok(value),
        }
    }

    fn pipeline(
        &self,
        family: &'static str,
        entry: &'static str,
        overrides: Vec<(&'static str, u32)>,
    ) -> Result<(wgpu::ComputePipeline, wgpu::BindGroupLayout)> {
        let key = (family, entry, overrides);
        if let Some(p) = lock(&self.pipelines).get(&key) {
            return Ok(p.clone());
        }
        let module = {
            let mut modules = lock(&self.modules);
            match modules.get(family) {
                Some(m) => m.clone(),
                None => {
                    let src = SHADERS
                        .iter()
                        .find(|(name, _)| *name == family)
                        .map(|(_, src)| *src)
                        .ok_or(Error::Gpu {
                            context: "shader lookup",
                            message: format!("no shader family `{family}`"),
                        })?;
                    let m = self.scoped("shader module", || {
                        self.device
                            .create_shader_module(wgpu::ShaderModuleDescriptor {
                                label: Some(family),
                                source: wgpu::ShaderSource::Wgsl(src.into()),
                            })
                    })?;
                    modules.insert(family, m.clone());
                    m
                }
            }
        };
        let constants: Vec<(&str, f64)> = key.2.iter().map(|(k, v)| (*k, f64::from(*v))).collect();
        let pipeline = self.scoped("compute pipeline", || {
            self.device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(entry),
                    layout: None,
                    module: &module,
                    entry_point: Some(entry),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants: &constants,
                        zero_initialize_workgroup_memory: false,
                    },
                    cache: None,
                })
        })?;
        let entry = (pipeline.clone(), pipeline.get_bind_group_layout(0));
        lock(&self.pipelines).insert(key, entry.clone());
        Ok(entry)
    }

    /// Workgroups for `invocations` one-dimensional invocations, folded into a 2-D grid
    /// when they exceed the per-dimension limit (the shaders rebuild the flat index).
    fn grid(&self, op: &'static str, invocations: u64) -> Result<(u32, u32)> {
        self.grid_of(op, invocations, WG)
    }

    /// [`Gpu::grid`] for workgroups of `wg` invocations.
    fn grid_of(&self, op: &'static str, invocations: u64, wg: u32) -> Result<(u32, u32)> {
        let groups = invocations.div_ceil(u64::from(wg)).max(1);
        let max = u64::from(self.limits.max_compute_workgroups_per_dimension);
        let x = groups.min(max);
        let y = groups.div_ceil(x);
        if y > max {
            return Err(Error::InvalidShape {
                op,
                reason: format!("{invocations} invocations exceed the device's dispatch limit"),
            });
        }
        Ok((x as u32, y as u32))
    }

    fn check_grid(&self, op: &'static str, x: u64, y: u64) -> Result<(u32, u32)> {
        let max = u64::from(self.limits.max_compute_workgroups_per_dimension);
        if x > max || y > max {
            return Err(Error::InvalidShape {
                op,
                reason: format!(
                    "{x}x{y} workgroups exceed the device's limit of {max} per dimension"
                ),
            });
        }
        Ok((x.max(1) as u32, y.max(1) as u32))
    }

    fn submit_pending(&self, pending: &mut Pending) {
        pending.pass = None;
        if let Some(enc) = pending.encoder.take() {
            self.queue.submit([enc.finish()]);
        }
        pending.ops = 0;
    }

    /// Wide products (output heads) and projections each have their tuned shape.
    fn matvec_shape(&self, n: u32) -> tune::MatvecShape {
        if n >= tune::WIDE_FROM {
            self.shapes.matvec_wide
        } else {
            self.shapes.matvec
        }
    }

    /// Whether one-token products of `wtype` in the tuned shape `mv` run on subgroups of 8.
    fn takes_sg8(&self, mv: tune::MatvecShape, wtype: WeightType) -> bool {
        mv.subgroup && self.subgroups_of_8() && has_split_layout(wtype)
    }

    /// One token's product `out = dequant(w) x` on subgroups of 8 (`qmatvec_sg8`) in the
    /// tuned shape `mv`, or with `more` the gate (`w`) and up products and SwiGLU in one
    /// dispatch (`qmatvec_swiglu_sg8`) or the q (`w`), k and v products in one
    /// (`qmatvec_qkv_sg8`), each with x made by a pending add and norm where `norm`;
    /// `false`, with nothing recorded, where the shape, the device or the format does not
    /// take them.
    fn matvec_sg8(&self, mv: tune::MatvecShape, p: &Matvec<'_>) -> Result<bool> {
        let (w, factors) = p.w;
        let (second, third, n2, rope) = match &p.more {
            More::None => (None, None, p.n, None),
            More::Up(up) => (Some(*up), None, p.n, None),
            More::Kv { k, v, n, rope, .. } => (Some(*k), Some(*v), *n, rope.as_ref()),
        };
        // One FACTORS override covers every weight.
        let same_factors = [second, third]
            .iter()
            .flatten()
            .all(|(_, f)| f.is_some() == factors.is_some());
        // q, k and v in one dispatch need whole row groups of the tuned shape in each, and
        // rotated, an invocation's rows within one head and their (cos, sin) pairs in whole
        // vec4s of the table (see `rotated` in quant_sg.wgsl).
        let whole = third.is_none() || (p.n.is_multiple_of(mv.rows) && n2.is_multiple_of(mv.rows));
        let rotates =
            rope.is_none_or(|r| mv.rows.is_multiple_of(4) && r.head_dim.is_multiple_of(mv.rows));
        if !(self.takes_sg8(mv, p.wtype) && same_factors && whole && rotates) {
            return Ok(false);
        }
        let (k, n) = (p.k, p.n);
        let (name, entry) = match (&p.more, p.norm.is_some()) {
            (More::Kv { rope: Some(_), .. }, _) => ("norm_qkv_rope", "qmatvec_qkv_sg8"),
            (More::Kv { rope: None, .. }, _) => ("norm_qkv", "qmatvec_qkv_sg8"),
            (More::Up(_), true) => ("norm_qmatvec", "qmatvec_swiglu_sg8"),
            (More::None, true) => ("norm_qmatvec", "qmatvec_sg8"),
            (More::Up(_), false) => ("qswiglu", "qmatvec_swiglu_sg8"),
            (More::None, false) => ("qmatvec", "qmatvec_sg8"),
        };
        let row_bytes = p.wtype.row_bytes(k as usize)? as u32;
        // Every weight from a texture, or every one from its buffer.
        let textures = if mv.texture {
            let views = [Some(w), second.map(|s| s.0), third.map(|t| t.0)].map(|b| match b {
                Some(b) => self.weight_texture(b),
                None => Some(&self.no_texture),
            });
            match views {
                [Some(a), Some(b), Some(c)] => Some([a, b, c]),
                _ => None,
            }
        } else {
            None
        };
        let (w2, factors2) = second.unwrap_or((w, factors));
        let (w3, factors3) = third.unwrap_or((w, factors));
        let (out2, out3) = match p.more {
            More::Kv { k_out, v_out, .. } => (k_out, v_out),
            _ => (p.out, p.out),
        };
        // Unused bindings get buffers already bound the same way (read-only, or `out`).
        let (resid, norm_w, sum, eps) = match &p.norm {
            Some(nm) => (nm.a, nm.weight, nm.sum.unwrap_or(p.out), nm.eps),
            None => (p.x, p.x, p.out, 0.0),
        };
        let summed = p.norm.as_ref().is_some_and(|nm| nm.sum.is_some());
        // Each invocation owns `rows` adjacent rows, whose scales are adjacent words only in
        // whole row groups or where n is a multiple of `rows`; otherwise the last, partial
        // row group takes one row per invocation (never with k and v: `whole` above).
        let tuned_end = if n.is_multiple_of(mv.rows) {
            n
        } else {
            n - n % SPLIT_ROW_GROUP as u32
        };
        let ranges = [(0, tuned_end, mv.rows), (tuned_end, n, 1)];
        let per_group = |rows: u32, count: u32| count.div_ceil(rows * mv.wg);
        for (row0, end, rows) in ranges.into_iter().filter(|(a, b, _)| a < b) {
            let groups = match p.more {
                More::Kv { .. } => per_group(rows, n) + per_group(rows, n2),
                _ => per_group(rows, end - row0),
            };
            let mut d = Dispatch {
                family: "quant_sg",
                entry,
                overrides: vec![
                    ("WTYPE", p.wtype.shader_code()),
                    ("FACTORS", u32::from(factors.is_some())),
                    ("ROWS", rows),
                    ("MV_WG", mv.wg),
                    ("TEX", u32::from(textures.is_some())),
                    ("NORM", u32::from(p.norm.is_some())),
                    ("SUM", u32::from(summed)),
                    ("ROPE", u32::from(rope.is_some())),
                ],
                bindings: vec![
                    (4, p.out),
                    (5, p.x),
                    (6, w),
                    (7, factors.unwrap_or(w)),
                    (10, w2),
                    (11, factors2.unwrap_or(w2)),
                    (13, resid),
                    (14, norm_w),
                    (15, sum),
                    (16, w3),
                    (17, factors3.unwrap_or(w3)),
                    (19, out2),
                    (20, out3),
                ],
                params: vec![
                    1,
                    k,
                    n,
                    row_bytes,
                    row0,
                    end,
                    eps.to_bits(),
                    n2,
                    rope.map_or(0, |r| r.head_dim),
                    rope.map_or(0, |r| r.pos),
                ],
                groups: self.check_grid(name, u64::from(groups), 1)?,
            };
            // Only the q, k and v entry declares the table (any read-only buffer where
            // it does not rotate).
            if let More::Kv { .. } = p.more {
                d.bindings.push((21, rope.map_or(p.x, |r| r.table)));
            }
            // x, resid and norm_w again as uniforms (every buffer can be one), read
            // instead of the storage bindings where they fit.
            let x_uniform = u64::from(k) * 4 <= X_UNIFORM_BYTES;
            d.overrides.push(("X_UNIFORM", u32::from(x_uniform)));
            let [t1, t2, t3] = textures.unwrap_or([&self.no_texture; 3]);
            let textures = [(8, t1), (12, t2), (18, t3)];
            self.dispatch_bound(d, &textures, &[(22, p.x), (23, resid), (24, norm_w)])?;
        }
        Ok(true)
    }

    /// [`Op::NormQkv`] `qkv` as one `qmatvec_qkv_sg8` dispatch, or with `rope` (and the
    /// outputs q_out, k_cache and v_cache in place of q, k and v) [`Op::NormQkvRope`]'s;
    /// `false`, with nothing recorded, where [`Gpu::matvec_sg8`] does not take it.
    fn qkv_sg8(
        &self,
        qkv: &Op<'_, GpuBuffer>,
        rope: Option<(KvRope<'_>, [&GpuBuffer; 3])>,
    ) -> Result<bool> {
        let Op::NormQkv {
            a,
            h,
            norm,
            sum,
            wq,
            wk,
            wv,
            q,
            k,
            v,
            q_factors,
            k_factors,
            v_factors,
            wtype,
            dim,
            n_q,
            n_kv,
            eps,
        } = *qkv
        else {
            return Ok(false);
        };
        let (rope, [q, k, v]) = match rope {
            Some((r, outs)) => (Some(r), outs),
            None => (None, [q, k, v]),
        };
        let fused = Matvec {
            x: h,
            norm: Some(PendingNorm {
                a,
                weight: norm,
                sum: Some(sum),
                eps,
            }),
            w: (wq, q_factors),
            more: More::Kv {
                k: (wk, k_factors),
                v: (wv, v_factors),
                k_out: k,
                v_out: v,
                n: n_kv,
                rope,
            },
            out: q,
            wtype,
            k: dim,
            n: n_q,
        };
        self.matvec_sg8(self.matvec_shape(n_q), &fused)
    }

    /// A pair of f32 scratch buffers of at least `bytes` each from `slot`, grown on demand.
    fn scratch_pair_in(
        &self,
        slot: &mut Option<[Arc<GpuBuffer>; 2]>,
        bytes: u64,
        what: &'static str,
    ) -> Result<[Arc<GpuBuffer>; 2]> {
        if let Some(pair) = slot.as_ref().filter(|p| p[0].size >= bytes) {
            return Ok(pair.clone());
        }
        let alloc = || self.alloc(bytes, what).map(Arc::new);
        let pair = [alloc()?, alloc()?];
        *slot = Some(pair.clone());
        Ok(pair)
    }

    fn dispatch(&self, d: Dispatch<'_>) -> Result<()> {
        self.dispatch_with(d, &[])
    }

    /// `dispatch`, with these textures bound beside the buffers.
    fn dispatch_with(&self, d: Dispatch<'_>, textures: &[(u32, &wgpu::TextureView)]) -> Result<()> {
        self.dispatch_bound(d, textures, &[])
    }

    /// `dispatch_with`, and these buffers' first `X_UNIFORM_BYTES` bound as uniforms.
    fn dispatch_bound(
        &self,
        d: Dispatch<'_>,
        textures: &[(u32, &wgpu::TextureView)],
        uniforms: &[(u32, &GpuBuffer)],
    ) -> Result<()> {
        for (_, buf) in &d.bindings {
            if buf.size > self.limits.max_storage_buffer_binding_size {
                return Err(Error::BufferTooLarge {
                    what: "storage binding",
                    bytes: buf.size,
                    limit: self.limits.max_storage_buffer_binding_size,
                });
            }
        }
        let pipeline = self.pipeline(d.family, d.entry, d.overrides)?;
        let mut words = d.params;
        words.resize(words.len().div_ceil(4).max(1) * 4, 0);
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut pending = lock(&self.pending);
        // The slot of this op in the pending submission: the write lands before that
        // submission runs, and after the previous one, which used the slot before.
        let own;
        let params = match self.param_slots.get(pending.ops as usize) {
            Some(slot) if bytes.len() as u64 <= PARAM_SLOT_BYTES => {
                self.queue.write_buffer(slot, 0, &bytes);
                slot
            }
            _ => {
                own = self
                    .device
                    .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                        label: Some("params"),
                        contents: &bytes,
                        usage: wgpu::BufferUsages::UNIFORM,
                    });
                &own
            }
        };
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: params.as_entire_binding(),
        }];
        entries.extend(
            d.bindings
                .iter()
                .map(|(binding, buf)| wgpu::BindGroupEntry {
                    binding: *binding,
                    resource: buf.buf.as_entire_binding(),
                }),
        );
        entries.extend(textures.iter().map(|(binding, view)| wgpu::BindGroupEntry {
            binding: *binding,
            resource: wgpu::BindingResource::TextureView(view),
        }));
        entries.extend(uniforms.iter().map(|(binding, buf)| wgpu::BindGroupEntry {
            binding: *binding,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &buf.buf,
                offset: 0,
                size: wgpu::BufferSize::new(X_UNIFORM_BYTES),
            }),
        }));
        // No error scope here: scopes cost a round trip per call on the hot path, and a
        // validation error still reaches our uncaptured-error handler and the next call.
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(d.entry),
            layout: &pipeline.1,
            entries: &entries,
        });
        let pass = pending.pass(&self.device);
        pass.set_pipeline(&pipeline.0);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(d.groups.0, d.groups.1, 1);
        // Recorded, so a copy into a mirror (recorded under the same lock) comes after.
        let writable = self.writable.get(d.family).copied().unwrap_or(u32::MAX);
        for (binding, buf) in &d.bindings {
            if writable.checked_shr(*binding).unwrap_or(1) & 1 == 1 {
                buf.set_mirror_valid(0);
            }
        }
        pending.ops += 1;
        if pending.ops >= MAX_OPS_PER_SUBMIT {
            self.submit_pending(&mut pending);
        }
        Ok(())
    }

    /// `w`'s texture (see `GpuBuffer::texture`), made and filled from the buffer on first
    /// use; `None` when it does not fit one (too large, not whole 16-byte texels, or no
    /// memory for a second copy), and the product reads the buffer.
    fn weight_texture<'b>(&self, w: &'b GpuBuffer) -> Option<&'b wgpu::TextureView> {
        if let Some(t) = w.texture.get() {
            return t.as_ref();
        }
        let texels = w.size / 16;
        let rows = texels.div_ceil(u64::from(WEIGHT_TEXTURE_WIDTH));
        if !w.size.is_multiple_of(16)
            || rows > u64::from(self.limits.max_texture_dimension_2d)
            || WEIGHT_TEXTURE_WIDTH > self.limits.max_texture_dimension_2d
        {
            return w.texture.get_or_init(|| None).as_ref();
        }
        let Ok(texture) = self.scoped("weight texture", || {
            self.device
                .create_texture(&weight_texture_desc(WEIGHT_TEXTURE_WIDTH, rows as u32))
        }) else {
            return w.texture.get_or_init(|| None).as_ref();
        };
        // Whole rows in one copy, then the part of the last row the buffer holds (rows
        // fit u32: at most the device's texture height).
        let row_bytes = WEIGHT_TEXTURE_WIDTH * 16;
        let full = (texels / u64::from(WEIGHT_TEXTURE_WIDTH)) as u32;
        let rest = (texels % u64::from(WEIGHT_TEXTURE_WIDTH)) as u32;
        let mut pending = lock(&self.pending);
        if full > 0 {
            let texels = (WEIGHT_TEXTURE_WIDTH, full);
            self.copy_to_texture(&mut pending, w, 0, row_bytes, &texture, 0, texels);
        }
        if rest > 0 {
            let offset = u64::from(full) * u64::from(row_bytes);
            self.copy_to_texture(
                &mut pending,
                w,
                offset,
                row_bytes,
                &texture,
                full,
                (rest, 1),
            );
        }
        drop(pending);
        let view = texture.create_view(&wgpu::TextureViewDescriptor::default());
        w.texture.get_or_init(|| Some(view)).as_ref()
    }

    /// x (m rows of k f32) copied into `slot`'s texture, grown to hold it; `None` where the
    /// copy is impossible (rows of k f32 must be whole multiples of 256 bytes), too large,
    /// or finds no memory, and the product reads x from its buffer.
    fn x_texture_of(
        &self,
        slot: &mut Option<wgpu::Texture>,
        x: &GpuBuffer,
        m: u32,
        k: u32,
    ) -> Option<wgpu::TextureView> {
        let max = self.limits.max_texture_dimension_2d;
        if !k.is_multiple_of(64) || k / 4 > max || m > max {
            return None;
        }
        let fits = |t: &wgpu::Texture| t.width() >= k / 4 && t.height() >= m;
        if !slot.as_ref().is_some_and(fits) {
            let (w, h) = slot.as_ref().map_or((0, 0), |t| (t.width(), t.height()));
            let Ok(t) = self.scoped("x texture", || {
                self.device
                    .create_texture(&weight_texture_desc((k / 4).max(w), m.max(h)))
            }) else {
                return None;
            };
            *slot = Some(t);
        }
        let t = slot.as_ref()?;
        self.copy_to_texture(&mut lock(&self.pending), x, 0, k * 4, t, 0, (k / 4, m));
        Some(t.create_view(&wgpu::TextureViewDescriptor::default()))
    }

    /// `write`, which records a dispatch writing KV caches `caches` (rows of `row` bytes)
    /// from row `pos` on, with their mirrors' rows before `pos` still valid afterwards
    /// (a decode step then copies one row per cache instead of all of them), though the
    /// dispatch, binding the caches writable, marks them all stale.
    fn keeping_kv_mirrors<T>(
        &self,
        caches: [&GpuBuffer; 2],
        row: u64,
        pos: u32,
        write: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let from = u64::from(pos).saturating_mul(row);
        let kept = caches.map(|c| c.mirror_valid().min(from));
        let done = write()?;
        for (cache, valid) in caches.into_iter().zip(kept) {
            cache.set_mirror_valid(valid);
        }
        Ok(done)
    }

    /// The texture mirror of KV cache `buf` (rows of `row_bytes`) with its first `rows`
    /// rows up to date, copying those past its valid part; `None` where it cannot have
    /// one (see [`Mirror::Unfit`], or rows of another size than its first use) and
    /// attention reads the buffer.
    fn kv_texture(&self, buf: &GpuBuffer, row_bytes: u32, rows: u32) -> Option<wgpu::TextureView> {
        // `pending` before the mirror, as `dispatch_with` takes them: a write and the copy
        // of its rows are recorded in the order the mirror's state says.
        let mut pending = lock(&self.pending);
        let mut mirror = lock(&buf.mirror);
        if matches!(*mirror, Mirror::Untried) {
            let max = u64::from(self.limits.max_texture_dimension_2d);
            let height = buf.size / u64::from(row_bytes);
            *mirror = if !row_bytes.is_multiple_of(256)
                || u64::from(row_bytes / 16) > max
                || height == 0
                || height > max
            {
                Mirror::Unfit
            } else {
                match self.scoped("kv texture", || {
                    self.device
                        .create_texture(&weight_texture_desc(row_bytes / 16, height as u32))
                }) {
                    Ok(texture) => Mirror::Held(Box::new(KvTexture {
                        view: texture.create_view(&wgpu::TextureViewDescriptor::default()),
                        texture,
                        row_bytes,
                        valid: 0,
                    })),
                    Err(_) => Mirror::Unfit,
                }
            };
        }
        let Mirror::Held(m) = &mut *mirror else {
            return None;
        };
        if m.row_bytes != row_bytes {
            return None;
        }
        let need = u64::from(rows) * u64::from(row_bytes);
        if m.valid < need {
            // Whole rows: `valid` is where a write started, which may fall inside a row.
            let from = (m.valid / u64::from(row_bytes)) as u32;
            self.copy_to_texture(
                &mut pending,
                buf,
                u64::from(from) * u64::from(row_bytes),
                row_bytes,
                &m.texture,
                from,
                (row_bytes / 16, rows - from),
            );
            m.valid = need;
        }
        Some(m.view.clone())
    }

    /// Records into `pending` a copy of `texels` (width, height) of 16 bytes from `buf` at
    /// `offset`, rows `row_bytes` apart, into `texture` from row `y`.
    #[allow(clippy::too_many_arguments)]
    fn copy_to_texture(
        &self,
        pending: &mut Pending,
        buf: &GpuBuffer,
        offset: u64,
        row_bytes: u32,
        texture: &wgpu::Texture,
        y: u32,
        texels: (u32, u32),
    ) {
        pending.encoder(&self.device).copy_buffer_to_texture(
            wgpu::TexelCopyBufferInfo {
                buffer: &buf.buf,
                layout: wgpu::TexelCopyBufferLayout {
                    offset,
                    bytes_per_row: Some(row_bytes),
                    rows_per_image: None,
                },
            },
            wgpu::TexelCopyTextureInfo {
                texture,
                mip_level: 0,
                origin: wgpu::Origin3d { x: 0, y, z: 0 },
                aspect: wgpu::TextureAspect::All,
            },
            wgpu::Extent3d {
                width: texels.0,
                height: texels.1,
                depth_or_array_layers: 1,
            },
        );
    }

    fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu {
                context: "wait",
                message: e.to_string(),
            })?;
        self.check_health()
    }
}

/// The parameter words shaders/philox.wgsl's z kernels share: (c0, tensor, seed, purpose),
/// the session key as the Philox key, the element count and the z kind.
fn z_params(
    c0: u32,
    tensor: u32,
    seed: u32,
    session_key: u64,
    n: u32,
    kind: crate::rng::ZKind,
) -> Vec<u32> {
    vec![
        c0,
        tensor,
        seed,
        crate::rng::PURPOSE_PERTURB,
        session_key as u32,
        (session_key >> 32) as u32,
        n,
        kind.shader_code(),
    ]
}

/// Whether `wtype` is stored in [`split_layout`] on the device (what the subgroup products
/// of quant_sg.wgsl read).
fn has_split_layout(wtype: WeightType) -> bool {
    matches!(
        wtype,
        WeightType::Q8_0 | WeightType::Q4_0 | WeightType::Q4_1
    )
}

/// Texels per row of a weight texture (`TEX_W` in shaders/quant_sg.wgsl): WebGPU
/// guarantees 8192, and rows of 64 KiB keep the padding of the last one small.
const WEIGHT_TEXTURE_WIDTH: u32 = 4096;

/// The bindings (bit n: binding n) that WGSL source `src` declares
/// `var<storage, read_write>`, as our shaders write them (`@binding(N)` on the same line);
/// all of them where a `read_write` is found that this does not parse, so a writable
/// binding is never taken for a read-only one.
fn writable_bindings(src: &str) -> u32 {
    let declared = src.matches("read_write>").count();
    let parsed: Vec<u32> = src
        .lines()
        .filter(|l| l.contains("var<storage, read_write>"))
        .filter_map(|l| {
            let at = l.find("@binding(")? + "@binding(".len();
            l[at..].split(')').next()?.parse::<u32>().ok()
        })
        .filter(|b| *b < 32)
        .collect();
    if parsed.len() != declared {
        return u32::MAX;
    }
    parsed.iter().fold(0, |bits, b| bits | 1 << b)
}

/// Whether the subgroup kernels' bindings fit: `Rgba32Uint` textures bound as read-only
/// storage textures, four to a kernel (`qmatmul_sg8`) beside fourteen storage buffers and
/// four uniforms of up to `X_UNIFORM_BYTES` (the one-token kernels), as wgpu will check
/// it: from the adapter on downlevel devices, else from WebGPU's guarantees (the device
/// never requests `TEXTURE_ADAPTER_SPECIFIC_FORMAT_FEATURES`, which would make wgpu ask
/// the adapter).
fn subgroup_bindings_fit(adapter: &wgpu::Adapter, limits: &wgpu::Limits) -> bool {
    let format = wgpu::TextureFormat::Rgba32Uint;
    let usable = |f: wgpu::TextureFormatFeatures| {
        f.allowed_usages
            .contains(wgpu::TextureUsages::STORAGE_BINDING)
            && f.flags
                .contains(wgpu::TextureFormatFeatureFlags::STORAGE_READ_ONLY)
    };
    let downlevel = !adapter
        .get_downlevel_capabilities()
        .flags
        .contains(wgpu::DownlevelFlags::WEBGPU_TEXTURE_FORMAT_SUPPORT);
    let features = if downlevel {
        adapter.get_texture_format_features(format)
    } else {
        format.guaranteed_format_features(wgpu::Features::empty())
    };
    limits.max_storage_textures_per_shader_stage >= 4
        && limits.max_storage_buffers_per_shader_stage >= 14
        && limits.max_uniform_buffers_per_shader_stage >= 4
        && limits.max_uniform_buffer_binding_size >= X_UNIFORM_BYTES
        && usable(features)
}

/// A weight texture of `width` x `height` texels of 16 bytes (u32 x 4, filled by copies,
/// read with `textureLoad`: by the products as a read-only storage texture, by decode
/// attention as a sampled one, which measured faster there).
fn weight_texture_desc(width: u32, height: u32) -> wgpu::TextureDescriptor<'static> {
    wgpu::TextureDescriptor {
        label: Some("weight texture"),
        size: wgpu::Extent3d {
            width,
            height,
            depth_or_array_layers: 1,
        },
        mip_level_count: 1,
        sample_count: 1,
        dimension: wgpu::TextureDimension::D2,
        format: wgpu::TextureFormat::Rgba32Uint,
        usage: wgpu::TextureUsages::TEXTURE_BINDING
            | wgpu::TextureUsages::STORAGE_BINDING
            | wgpu::TextureUsages::COPY_DST,
        view_formats: &[],
    }
}

/// Rows per group of [`split_layout`] (`ROW_GROUP` in the quant shaders).
pub const SPLIT_ROW_GROUP: usize = 64;

/// The device layout of the 32-element block formats (see shaders/quant.wgsl): every
/// block's scale first (u16 d; for Q4_1 a u32 of d and m), padded to 16 bytes, then every
/// block's quants, 16 or 32 bytes each. Blocks are ordered by groups of
/// [`SPLIT_ROW_GROUP`] rows (the last may be shorter), and within a group chunk by chunk,
/// row by row: a matrix-vector workgroup's rows at one chunk are then adjacent, so its
/// loads form one stream instead of one per row, which measured about 1.3x faster decode
/// on lavapipe. `None` for formats kept in their GGUF layout.
pub fn split_layout(wtype: WeightType, data: &[u8], cols: u32) -> Result<Option<Vec<u8>>> {
    if !has_split_layout(wtype) {
        return Ok(None);
    }
    let (scale_bytes, quant_offset) = if wtype == WeightType::Q4_1 {
        (4, 4)
    } else {
        (2, 2)
    };
    let bb = wtype.block_bytes();
    if !data.len().is_multiple_of(bb) {
        return Err(Error::InvalidShape {
            op: "upload_weights",
            reason: format!(
                "{} bytes is not a whole number of {} blocks",
                data.len(),
                wtype.name()
            ),
        });
    }
    let n_blocks = data.len() / bb;
    let chunks = cols as usize / wtype.block_elems();
    if chunks == 0
        || !(cols as usize).is_multiple_of(wtype.block_elems())
        || !n_blocks.is_multiple_of(chunks)
    {
        return Err(Error::InvalidShape {
            op: "upload_weights",
            reason: format!(
                "{n_blocks} {} blocks are not whole rows of {cols} elements",
                wtype.name()
            ),
        });
    }
    let rows = n_blocks / chunks;
    let quants_at = (n_blocks * scale_bytes).div_ceil(16) * 16;
    let mut out = vec![0u8; quants_at + n_blocks * (bb - quant_offset)];
    let q = bb - quant_offset;
    for (b, block) in data.chunks_exact(bb).enumerate() {
        let (j, c) = (b / chunks, b % chunks);
        let g0 = j - j % SPLIT_ROW_GROUP;
        let s = g0 * chunks + c * SPLIT_ROW_GROUP.min(rows - g0) + j - g0;
        out[s * scale_bytes..(s + 1) * scale_bytes].copy_from_slice(&block[..scale_bytes]);
        out[quants_at + s * q..quants_at + (s + 1) * q].copy_from_slice(&block[quant_offset..]);
    }
    Ok(Some(out))
}

/// One kernel launch: which pipeline, which buffers at which bindings, the uniform words.
struct Dispatch<'a> {
    family: &'static str,
    entry: &'static str,
    overrides: Vec<(&'static str, u32)>,
    bindings: Vec<(u32, &'a GpuBuffer)>,
    params: Vec<u32>,
    groups: (u32, u32),
}

impl Backend for Gpu {
    type Buffer = GpuBuffer;

    /// Where the subgroup products take the weights (their kernels norm x themselves).
    fn fuses_norm(&self, wtype: WeightType, n: u32) -> bool {
        self.takes_sg8(self.matvec_shape(n), wtype)
    }

    fn name(&self) -> String {
        format!("{} ({:?})", self.info.name, self.info.backend)
    }

    /// A buffer of `bytes`, whose wgpu buffer is at least `X_UNIFORM_BYTES` and may be
    /// bound as a uniform too, so that any buffer can be the subgroup products' x.
    fn alloc(&self, bytes: u64, what: &'static str) -> Result<GpuBuffer> {
        self.check_health()?;
        let size = bytes.max(4).div_ceil(4) * 4;
        if size > self.limits.max_buffer_size {
            return Err(Error::BufferTooLarge {
                what,
                bytes: size,
                limit: self.limits.max_buffer_size,
            });
        }
        let buf = self
            .scoped(what, || {
                self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(what),
                    size: size.max(X_UNIFORM_BYTES),
                    usage: wgpu::BufferUsages::STORAGE
                        | wgpu::BufferUsages::UNIFORM
                        | wgpu::BufferUsages::COPY_SRC
                        | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            })
            .map_err(|e| match e {
                Error::OutOfMemory { .. } => Error::OutOfMemory { what, bytes: size },
                other => other,
            })?;
        Ok(GpuBuffer {
            buf,
            size,
            texture: OnceLock::new(),
            mirror: Mutex::default(),
        })
    }

    fn upload(&self, data: &[u8], what: &'static str) -> Result<GpuBuffer> {
        let buf = self.alloc(data.len() as u64, what)?;
        let whole = data.len() / 4 * 4;
        if whole > 0 {
            self.queue.write_buffer(&buf.buf, 0, &data[..whole]);
        }
        if whole < data.len() {
            let mut tail = [0u8; 4];
            tail[..data.len() - whole].copy_from_slice(&data[whole..]);
            self.queue.write_buffer(&buf.buf, whole as u64, &tail);
        }
        // wgpu stages written data until the next submission; flushing every so often keeps
        // the staging copies of a whole model from piling up in memory while it loads.
        let mut staged = lock(&self.staged);
        *staged += data.len() as u64;
        if *staged >= MAX_STAGED_BYTES {
            *staged = 0;
            drop(staged);
            self.sync()?;
        }
        Ok(buf)
    }

    fn upload_weights(
        &self,
        wtype: WeightType,
        data: &[u8],
        cols: u32,
        what: &'static str,
    ) -> Result<GpuBuffer> {
        match split_layout(wtype, data, cols)? {
            Some(split) => self.upload(&split, what),
            None => self.upload(data, what),
        }
    }

    fn size(&self, buf: &GpuBuffer) -> u64 {
        buf.size
    }

    fn read(&self, buf: &GpuBuffer) -> Result<Vec<u8>> {
        self.check_health()?;
        let staging = self.scoped("readback", || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback"),
                size: buf.size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })?;
        {
            let mut pending = lock(&self.pending);
            pending
                .encoder(&self.device)
                .copy_buffer_to_buffer(&buf.buf, 0, &staging, 0, buf.size);
            self.submit_pending(&mut pending);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            // The receiver outlives the wait below; a failed send cannot happen.
            let _ = tx.send(r);
        });
        self.wait()?;
        // The work is done, but with several threads on one device the callback may be
        // running on another thread's poll right now: give it time rather than failing.
        match rx.recv_timeout(std::time::Duration::from_secs(30)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(Error::Gpu {
                    context: "readback map",
                    message: e.to_string(),
                });
            }
            Err(_) => {
                return Err(Error::Gpu {
                    context: "readback map",
                    message: "the mapping callback never ran".into(),
                });
            }
        }
        let data = staging
            .slice(..)
            .get_mapped_range()
            .map_err(|e| Error::Gpu {
                context: "readback map",
                message: e.to_string(),
            })?
            .to_vec();
        staging.unmap();
        Ok(data)
    }

    fn sync(&self) -> Result<()> {
        self.check_health()?;
        self.submit_pending(&mut lock(&self.pending));
        self.wait()
    }

    fn run(&self, op: &Op<'_, GpuBuffer>) -> Result<()> {
        self.check_health()?;
        op.check(|b| b.size)?;
        let name = op.name();
        let d = match *op {
            Op::Matmul {
                a,
                b,
                out,
                m,
                k,
                n,
                a_t,
                b_t,
            } => {
                if k.is_multiple_of(4) && n.is_multiple_of(8) && (!a_t || m.is_multiple_of(8)) {
                    Dispatch {
                        family: "matmul",
                        entry: "matmul8",
                        overrides: vec![("TA", u32::from(a_t)), ("TB", u32::from(b_t))],
                        bindings: vec![(4, b), (5, a), (6, out)],
                        params: vec![m, k, n],
                        groups: self.check_grid(
                            name,
                            u64::from(n.div_ceil(64)),
                            u64::from(m.div_ceil(64)),
                        )?,
                    }
                } else {
                    Dispatch {
                        family: "matmul",
                        entry: "matmul",
                        overrides: vec![("TA", u32::from(a_t)), ("TB", u32::from(b_t))],
                        bindings: vec![(1, a), (2, b), (3, out)],
                        params: vec![m, k, n],
                        groups: self.check_grid(
                            name,
                            u64::from(n.div_ceil(32)),
                            u64::from(m.div_ceil(32)),
                        )?,
                    }
                }
            }
            Op::QMatmul {
                x,
                w,
                factors,
                out,
                wtype,
                m,
                k,
                n,
            } => {
                let row_bytes = wtype.row_bytes(k as usize)? as u32;
                // Many tokens on subgroups of 8: the blocks are read as they are.
                if m >= DEQUANT_MATMUL_FROM
                    && self.shapes.prompt_matmul != tune::Variant::Portable
                    && self.subgroups_of_8()
                    && has_split_layout(wtype)
                {
                    let texture = if self.shapes.prompt_matmul == tune::Variant::Subgroup8Texture {
                        self.weight_texture(w)
                    } else {
                        None
                    };
                    // With the weights, x goes into a texture too. The slot is held until
                    // the product is recorded, so no other product's copy lands between.
                    let mut slot = texture.map(|_| lock(&self.x_texture));
                    let xt = match slot.as_deref_mut() {
                        Some(slot) => self.x_texture_of(slot, x, m, k),
                        None => None,
                    };
                    // Workgroup (x, y): 256 weight rows, 8 rows of x.
                    let d = Dispatch {
                        family: "quant_sg",
                        entry: "qmatmul_sg8",
                        overrides: vec![
                            ("WTYPE", wtype.shader_code()),
                            ("FACTORS", u32::from(factors.is_some())),
                            ("TEX", u32::from(texture.is_some())),
                            ("XTEX", u32::from(xt.is_some())),
                        ],
                        // 10-12 and 16-18: the second and third weights of the one-token
                        // kernels, unused here.
                        bindings: vec![
                            (1, w),
                            (4, out),
                            (5, x),
                            (6, w),
                            (7, factors.unwrap_or(w)),
                            (10, w),
                            (11, w),
                            (16, w),
                            (17, w),
                        ],
                        // Padded to the size of `Params`.
                        params: vec![m, k, n, row_bytes, 0, n, 0, n, 0, 0],
                        groups: self.check_grid(
                            name,
                            u64::from(n.div_ceil(256)),
                            u64::from(m.div_ceil(8)),
                        )?,
                    };
                    return self.dispatch_with(
                        d,
                        &[
                            (8, texture.unwrap_or(&self.no_texture)),
                            (9, xt.as_ref().unwrap_or(&self.no_texture)),
                            (12, &self.no_texture),
                            (18, &self.no_texture),
                        ],
                    );
                }
                // Many tokens: dequantise the weights once into f32 scratch and use the
                // register-blocked matmul, which outruns dequantising per tile (issue 3's
                // prompt processing; see BENCHMARKS.md).
                let scratch_bytes = u64::from(n) * u64::from(k) * 4;
                if m >= DEQUANT_MATMUL_FROM
                    && k.is_multiple_of(4)
                    && n.is_multiple_of(8)
                    && scratch_bytes <= self.limits.max_storage_buffer_binding_size
                {
                    let _pair = lock(&self.scratch_pair);
                    let scratch = self.scratch(scratch_bytes)?;
                    self.run(&Op::Dequant {
                        w,
                        factors,
                        out: &scratch,
                        wtype,
                        rows: n,
                        cols: k,
                    })?;
                    return self.run(&Op::Matmul {
                        a: x,
                        b: &scratch,
                        out,
                        m,
                        k,
                        n,
                        a_t: false,
                        b_t: true,
                    });
                }
                let mv = self.matvec_shape(n);
                let plain = Matvec {
                    x,
                    norm: None,
                    w: (w, factors),
                    more: More::None,
                    out,
                    wtype,
                    k,
                    n,
                };
                if m == 1 && self.matvec_sg8(mv, &plain)? {
                    return Ok(());
                }
                let (entry, groups) = if m == 1 && mv.split {
                    // One workgroup per `rows` rows.
                    let groups = u64::from(n.div_ceil(mv.rows)) * u64::from(mv.wg);
                    ("qmatvec_split", self.grid_of(name, groups, mv.wg)?)
                } else if m == 1 {
                    (
                        "qmatvec",
                        self.grid_of(name, u64::from(n.div_ceil(mv.rows)), mv.wg)?,
                    )
                } else {
                    (
                        "qmatmul",
                        self.check_grid(name, u64::from(n.div_ceil(WG)), u64::from(m.div_ceil(4)))?,
                    )
                };
                Dispatch {
                    family: "quant",
                    entry,
                    overrides: vec![
                        ("WTYPE", wtype.shader_code()),
                        ("X4", u32::from(k.is_multiple_of(4))),
                        ("ROWS", mv.rows),
                        ("MV_WG", mv.wg),
                        ("FACTORS", u32::from(factors.is_some())),
                    ],
                    // x and w are bound twice: as scalars and as vectors.
                    bindings: vec![
                        (1, w),
                        (2, x),
                        (4, out),
                        (5, x),
                        (6, w),
                        (7, factors.unwrap_or(w)),
                    ],
                    params: vec![m, k, n, row_bytes],
                    groups,
                }
            }
            Op::QSwiGlu {
                x,
                gate,
                up,
                gate_factors,
                up_factors,
                out,
                wtype,
                m,
                k,
                n,
            } => {
                let fused = Matvec {
                    x,
                    norm: None,
                    w: (gate, gate_factors),
                    more: More::Up((up, up_factors)),
                    out,
                    wtype,
                    k,
                    n,
                };
                if m == 1 && self.matvec_sg8(self.matvec_shape(n), &fused)? {
                    return Ok(());
                }
                // Elsewhere the two products and SwiGLU, through a pair of scratch buffers.
                let bytes = u64::from(m) * u64::from(n) * 4;
                let mut slot = lock(&self.swiglu_scratch);
                let pair = self.scratch_pair_in(&mut slot, bytes, "swiglu scratch")?;
                for (w, factors, product) in
                    [(gate, gate_factors, &pair[0]), (up, up_factors, &pair[1])]
                {
                    self.run(&Op::QMatmul {
                        x,
                        w,
                        factors,
                        out: product,
                        wtype,
                        m,
                        k,
                        n,
                    })?;
                }
                return self.run(&Op::SwiGlu {
                    gate: &pair[0],
                    up: &pair[1],
                    out,
                    n: m * n,
                });
            }
            Op::NormMatvec {
                a,
                h,
                norm,
                w,
                out,
                sum,
                factors,
                up,
                up_factors,
                wtype,
                k,
                n,
                eps,
            } => {
                let fused = Matvec {
                    x: h,
                    norm: Some(PendingNorm {
                        a,
                        weight: norm,
                        sum,
                        eps,
                    }),
                    w: (w, factors),
                    more: up.map_or(More::None, |u| More::Up((u, up_factors))),
                    out,
                    wtype,
                    k,
                    n,
                };
                if self.matvec_sg8(self.matvec_shape(n), &fused)? {
                    return Ok(());
                }
                // Elsewhere the add and the norm through a pair of scratch buffers (the sum
                // into `sum` where given), then the product.
                let mut slot = lock(&self.norm_scratch);
                let pair = self.scratch_pair_in(&mut slot, u64::from(k) * 4, "norm scratch")?;
                let s = sum.unwrap_or(&*pair[0]);
                self.run(&Op::Add {
                    a,
                    b: h,
                    out: s,
                    n: k,
                })?;
                self.run(&Op::RmsNorm {
                    x: s,
                    weight: norm,
                    out: &pair[1],
                    rows: 1,
                    dim: k,
                    eps,
                })?;
                return match up {
                    Some(up) => self.run(&Op::QSwiGlu {
                        x: &pair[1],
                        gate: w,
                        up,
                        gate_factors: factors,
                        up_factors,
                        out,
                        wtype,
                        m: 1,
                        k,
                        n,
                    }),
                    None => self.run(&Op::QMatmul {
                        x: &pair[1],
                        w,
                        factors,
                        out,
                        wtype,
                        m: 1,
                        k,
                        n,
                    }),
                };
            }
            Op::NormQkv {
                a,
                h,
                norm,
                sum,
                wq,
                wk,
                wv,
                q,
                k,
                v,
                q_factors,
                k_factors,
                v_factors,
                wtype,
                dim,
                n_q,
                n_kv,
                eps,
            } => {
                if self.qkv_sg8(op, None)? {
                    return Ok(());
                }
                // Elsewhere each product with the add and norm (q's storing the sum).
                for (i, (w, factors, out, n)) in [
                    (wq, q_factors, q, n_q),
                    (wk, k_factors, k, n_kv),
                    (wv, v_factors, v, n_kv),
                ]
                .into_iter()
                .enumerate()
                {
                    self.run(&Op::NormMatvec {
                        a,
                        h,
                        norm,
                        w,
                        out,
                        sum: (i == 0).then_some(sum),
                        factors,
                        up: None,
                        up_factors: None,
                        wtype,
                        k: dim,
                        n,
                        eps,
                    })?;
                }
                return Ok(());
            }
            Op::NormQkvRope {
                table,
                q_out,
                k_cache,
                v_cache,
                n_kv,
                head_dim,
                pos,
                style,
                ..
            } => {
                if let Some([qkv, rope]) = op.qkv_rope_parts() {
                    // The fused kernel rotates GGUF's interleaved pairs, which lie in one
                    // invocation's adjacent rows; Hugging Face's half-split ones do not.
                    if style == RopeStyle::Interleaved {
                        let into = (
                            KvRope {
                                table,
                                head_dim,
                                pos,
                            },
                            [q_out, k_cache, v_cache],
                        );
                        let row = u64::from(n_kv) * 4;
                        if self.keeping_kv_mirrors([k_cache, v_cache], row, pos, || {
                            self.qkv_sg8(&qkv, Some(into))
                        })? {
                            return Ok(());
                        }
                    }
                    self.run(&qkv)?;
                    self.run(&rope)?;
                }
                return Ok(());
            }
            Op::Dequant {
                w,
                factors,
                out,
                wtype,
                rows,
                cols,
            } => Dispatch {
                family: "quant",
                entry: "dequant",
                overrides: vec![
                    ("WTYPE", wtype.shader_code()),
                    ("FACTORS", u32::from(factors.is_some())),
                ],
                bindings: vec![(1, w), (4, out), (6, w), (7, factors.unwrap_or(w))],
                params: vec![1, cols, rows, wtype.row_bytes(cols as usize)? as u32],
                groups: self.grid(name, u64::from(rows) * u64::from(cols.div_ceil(32)))?,
            },
            Op::Embed {
                table,
                ids,
                out,
                wtype,
                vocab,
                dim,
                n_ids,
            } => Dispatch {
                family: "quant",
                entry: "embed",
                overrides: vec![("WTYPE", wtype.shader_code())],
                bindings: vec![(1, table), (3, ids), (4, out), (6, table), (7, table)],
                params: vec![n_ids, dim, vocab, wtype.row_bytes(dim as usize)? as u32],
                groups: self.grid(name, u64::from(n_ids) * u64::from(dim.div_ceil(32)))?,
            },
            Op::RmsNorm {
                x,
                weight,
                out,
                rows,
                dim,
                eps,
            } => Dispatch {
                family: "rmsnorm",
                entry: "rmsnorm",
                overrides: vec![],
                bindings: vec![(1, x), (2, weight), (3, out)],
                params: vec![rows, dim, eps.to_bits()],
                groups: self.grid(name, u64::from(rows))?,
            },
            Op::AddRmsNorm {
                a,
                h,
                sum,
                weight,
                rows,
                dim,
                eps,
            } => Dispatch {
                family: "rmsnorm",
                entry: "add_rmsnorm",
                overrides: vec![],
                bindings: vec![(1, a), (2, weight), (3, sum), (5, h)],
                params: vec![rows, dim, eps.to_bits()],
                groups: self.grid(name, u64::from(rows))?,
            },
            Op::Rope {
                x,
                table,
                out,
                n_tokens,
                n_heads,
                head_dim,
                pos0,
                row0,
                style,
            } => Dispatch {
                family: "rope",
                entry: "rope",
                overrides: vec![("STYLE", u32::from(style == RopeStyle::HalfSplit))],
                bindings: vec![(1, x), (2, table), (3, out)],
                params: vec![n_tokens, n_heads, head_dim, pos0, row0],
                groups: self.grid(
                    name,
                    u64::from(n_tokens) * u64::from(n_heads) * u64::from(head_dim / 2),
                )?,
            },
            Op::RopeKv {
                q,
                k,
                v,
                table,
                q_out,
                k_cache,
                v_cache,
                n_tokens,
                n_heads,
                n_kv_heads,
                head_dim,
                pos0,
                style,
            } => Dispatch {
                family: "rope",
                entry: "rope_kv",
                overrides: vec![("STYLE", u32::from(style == RopeStyle::HalfSplit))],
                bindings: vec![
                    (1, q),
                    (2, table),
                    (3, q_out),
                    (4, k),
                    (5, v),
                    (6, k_cache),
                    (7, v_cache),
                ],
                params: vec![n_tokens, n_heads, head_dim, pos0, 0, n_kv_heads],
                // One invocation per rotated pair of q and of k, then per two values of v.
                groups: self.grid(
                    name,
                    u64::from(n_tokens)
                        * u64::from(n_heads + 2 * n_kv_heads)
                        * u64::from(head_dim / 2),
                )?,
            },
            Op::Softmax { x, out, rows, cols } => Dispatch {
                family: "softmax",
                entry: "softmax",
                overrides: vec![],
                bindings: vec![(1, x), (2, out)],
                params: vec![rows, cols],
                groups: self.grid(name, u64::from(rows))?,
            },
            Op::SwiGlu {
                gate: a,
                up: b,
                out,
                n,
            }
            | Op::Add { a, b, out, n } => Dispatch {
                family: "elementwise",
                entry: if matches!(op, Op::Add { .. }) {
                    "add"
                } else {
                    "swiglu"
                },
                overrides: vec![],
                bindings: vec![(1, a), (2, b), (3, out)],
                params: vec![n],
                groups: self.grid(name, u64::from(n))?,
            },
            Op::Scale { x, out, n, alpha } => Dispatch {
                family: "elementwise",
                entry: "scale",
                overrides: vec![],
                bindings: vec![(1, x), (3, out)],
                params: vec![n, alpha.to_bits()],
                groups: self.grid(name, u64::from(n))?,
            },
            Op::AddBias {
                x,
                bias,
                out,
                rows,
                cols,
            } => Dispatch {
                family: "elementwise",
                entry: "add_bias",
                overrides: vec![],
                bindings: vec![(1, x), (2, bias), (3, out)],
                params: vec![rows * cols, 0, cols],
                groups: self.grid(name, u64::from(rows) * u64::from(cols))?,
            },
            Op::Copy {
                src,
                dst,
                n,
                src_offset,
                dst_offset,
            } => Dispatch {
                family: "elementwise",
                entry: "copy",
                overrides: vec![],
                bindings: vec![(1, src), (3, dst)],
                params: vec![n, 0, src_offset, dst_offset],
                groups: self.grid(name, u64::from(n))?,
            },
            Op::Attention {
                q,
                k,
                v,
                out,
                n_tokens,
                n_heads,
                n_kv_heads,
                head_dim,
                pos0,
                row0,
                scale,
            } => {
                let pairs = n_tokens * n_heads;
                let decode = pairs < tune::DECODE_PAIRS_BELOW;
                let prefill = self.shapes.attention_prefill;
                let shape = if decode {
                    self.shapes.attention_decode
                } else {
                    tune::AttentionShape::v4(ATTENTION_WG)
                };
                // `attention_dsg8`'s shape: a decode step's, or with `sg8t` a prompt's, in
                // one pass per (token, kv head) over texture copies (the tokens are the
                // parallelism; the chunks exist for steps of few tokens).
                let sg = match (decode, prefill) {
                    (true, _) => Some(shape),
                    (false, tune::Variant::Subgroup8Texture) => Some(tune::AttentionShape {
                        wg: PREFILL_CHUNK,
                        split: false,
                        gqa: false,
                        subgroup: true,
                        texture: true,
                        one_pass: 0,
                    }),
                    _ => None,
                }
                .filter(|s| s.subgroup);
                let params = vec![
                    n_tokens,
                    n_heads,
                    n_kv_heads,
                    head_dim,
                    pos0,
                    scale.to_bits(),
                    row0,
                ];
                let wg = shape.wg;
                // Positions per workgroup of the subgroup form: the whole context where
                // it takes it in one pass.
                let context = pos0 + n_tokens;
                let sg_wg = match sg {
                    Some(s) if context <= s.one_pass => s.one_pass,
                    Some(s) => s.wg,
                    None => 1,
                };
                // Chunked attention's partial results: (head_dim + 2) values per (token,
                // head, chunk); none for one chunk, which goes straight into `out` (the
                // binding then takes the scratch as it is).
                let chunks = context.div_ceil(sg_wg);
                let part_bytes = match chunks {
                    1 => 4,
                    _ => {
                        u64::from(n_tokens * n_heads)
                            * u64::from(chunks)
                            * u64::from(head_dim + 2)
                            * 4
                    }
                };
                if let Some(sg) = sg
                    && part_bytes <= self.limits.max_storage_buffer_binding_size
                    && self.subgroups_of_8()
                    && head_dim.is_multiple_of(32)
                    && head_dim <= 128
                    && (1..=4).contains(&(n_heads / n_kv_heads))
                {
                    // Workgroup (chunk, token * n_kv_heads + kv head) into the scratch,
                    // then one invocation per (token, head, vec4) merging the chunks; one
                    // chunk goes straight into `out`.
                    let row_bytes = n_kv_heads * head_dim * 4;
                    let rows = row0 + pos0 + n_tokens;
                    // A decode call from position 0 reads a cache (or per-layer keys) just
                    // written whole: a texture copy would be all cost; a prompt's is not.
                    let k_view = match sg.texture && (pos0 > 0 || !decode) {
                        true => self.kv_texture(k, row_bytes, rows),
                        false => None,
                    };
                    let views = match k_view {
                        Some(kt) => self.kv_texture(v, row_bytes, rows).map(|vt| (kt, vt)),
                        None => None,
                    };
                    let (kt, vt) = views
                        .as_ref()
                        .map_or((&self.no_texture, &self.no_texture), |(a, b)| (a, b));
                    let mut params = params;
                    params.push(chunks);
                    let _pair = lock(&self.scratch_pair);
                    let part = self.scratch(part_bytes)?;
                    self.dispatch_with(
                        Dispatch {
                            family: "attention_sg",
                            entry: "attention_dsg8",
                            overrides: vec![
                                ("HD4", head_dim / 4),
                                ("GQA", n_heads / n_kv_heads),
                                ("CHUNK", sg_wg),
                                ("TEX", u32::from(views.is_some())),
                            ],
                            bindings: vec![(5, q), (6, k), (7, v), (8, out), (9, &part)],
                            params: params.clone(),
                            groups: self.check_grid(
                                name,
                                u64::from(chunks),
                                u64::from(n_tokens) * u64::from(n_kv_heads),
                            )?,
                        },
                        &[(10, kt), (11, vt)],
                    )?;
                    if chunks == 1 {
                        // attention_dsg8 wrote `out` itself.
                        return Ok(());
                    }
                    return self.dispatch(Dispatch {
                        family: "attention_sg",
                        entry: "attention_merge",
                        overrides: vec![("HD4", head_dim / 4)],
                        bindings: vec![(8, out), (9, &part)],
                        params,
                        groups: self.grid_of(
                            name,
                            u64::from(n_tokens * n_heads) * u64::from(head_dim / 4),
                            64,
                        )?,
                    });
                }
                // `sg8t` where `attention_dsg8` cannot take the heads falls back to this.
                if !decode
                    && prefill != tune::Variant::Portable
                    && self.subgroups_of_8()
                    && head_dim.is_multiple_of(32)
                    && head_dim <= 128
                {
                    // Workgroup (x, h): PREFILL_SG_WG tokens of head h.
                    Dispatch {
                        family: "attention_sg",
                        entry: "attention_sg8",
                        overrides: vec![("HD4", head_dim / 4), ("AT_WG", PREFILL_SG_WG)],
                        bindings: vec![(5, q), (6, k), (7, v), (8, out)],
                        params,
                        groups: self.check_grid(
                            name,
                            u64::from(n_tokens.div_ceil(PREFILL_SG_WG)),
                            u64::from(n_heads),
                        )?,
                    }
                } else if head_dim.is_multiple_of(4)
                    && head_dim <= 128
                    && shape.gqa
                    && (1..=4).contains(&(n_heads / n_kv_heads))
                {
                    // One workgroup per (token, kv head).
                    let kv_pairs = u64::from(n_tokens) * u64::from(n_kv_heads);
                    Dispatch {
                        family: "attention",
                        entry: "attention_gqa",
                        overrides: vec![
                            ("HD4", head_dim / 4),
                            ("AT_SPLIT", wg),
                            ("GQA", n_heads / n_kv_heads),
                        ],
                        bindings: vec![(5, q), (6, k), (7, v), (8, out)],
                        params,
                        groups: self.grid_of(name, kv_pairs * u64::from(wg), wg)?,
                    }
                } else if head_dim.is_multiple_of(4) && head_dim <= 128 && shape.split {
                    // One workgroup per (token, head).
                    Dispatch {
                        family: "attention",
                        entry: "attention_split",
                        overrides: vec![("HD4", head_dim / 4), ("AT_SPLIT", wg)],
                        bindings: vec![(5, q), (6, k), (7, v), (8, out)],
                        params,
                        groups: self.grid_of(name, u64::from(pairs) * u64::from(wg), wg)?,
                    }
                } else if head_dim.is_multiple_of(4) && head_dim <= 128 {
                    Dispatch {
                        family: "attention",
                        entry: "attention_v4",
                        overrides: vec![("HD4", head_dim / 4), ("AT_WG", wg)],
                        bindings: vec![(5, q), (6, k), (7, v), (8, out)],
                        params,
                        groups: self.grid_of(name, u64::from(pairs), wg)?,
                    }
                } else {
                    Dispatch {
                        family: "attention",
                        entry: "attention",
                        overrides: vec![],
                        bindings: vec![(1, q), (2, k), (3, v), (4, out)],
                        params,
                        groups: self.grid(name, u64::from(pairs))?,
                    }
                }
            }
            Op::Philox {
                out,
                counter,
                key,
                n_blocks,
            } => Dispatch {
                family: "philox",
                entry: "philox",
                overrides: vec![],
                bindings: vec![(1, out)],
                params: vec![
                    counter[0], counter[1], counter[2], counter[3], key[0], key[1], n_blocks,
                ],
                groups: self.grid(name, u64::from(n_blocks))?,
            },
            Op::PerturbZ {
                out,
                session_key,
                seed,
                tensor,
                start,
                n,
                kind,
            } => Dispatch {
                family: "philox",
                entry: "perturb_z",
                overrides: vec![],
                bindings: vec![(2, out)],
                params: z_params(start, tensor, seed, session_key, n, kind),
                groups: self.grid(name, u64::from(n))?,
            },
            Op::ZoWeights {
                base,
                acc,
                out,
                n,
                step,
                eps,
                session_key,
                seed,
                tensor,
                kind,
            } => Dispatch {
                family: "philox",
                entry: "zo_weights",
                overrides: vec![],
                bindings: vec![(2, out), (3, base), (4, acc)],
                params: [
                    z_params(0, tensor, seed, session_key, n, kind),
                    vec![step.to_bits(), eps.to_bits()],
                ]
                .concat(),
                groups: self.grid(name, u64::from(n))?,
            },
            Op::ZoAccumulate {
                acc,
                seeds,
                n,
                n_seeds,
                session_key,
                tensor,
                kind,
            } => Dispatch {
                family: "philox",
                entry: "zo_accumulate",
                overrides: vec![],
                bindings: vec![(4, acc), (5, seeds)],
                params: z_params(n_seeds, tensor, 0, session_key, n, kind),
                groups: self.grid(name, u64::from(n))?,
            },
            Op::MulCols {
                x,
                scale,
                out,
                rows,
                cols,
            } => Dispatch {
                family: "elementwise",
                entry: "mul_cols",
                overrides: vec![],
                bindings: vec![(1, x), (2, scale), (3, out)],
                params: vec![rows * cols, 0, cols],
                groups: self.grid(name, u64::from(rows) * u64::from(cols))?,
            },
            Op::QMatmulT {
                dy,
                w,
                factors,
                dx,
                wtype,
                m,
                k,
                n,
            } => Dispatch {
                family: "quant",
                entry: "qmatmul_t",
                overrides: vec![
                    ("WTYPE", wtype.shader_code()),
                    ("FACTORS", u32::from(factors.is_some())),
                ],
                bindings: vec![(1, w), (2, dy), (4, dx), (6, w), (7, factors.unwrap_or(w))],
                params: vec![m, k, n, wtype.row_bytes(k as usize)? as u32],
                groups: self.grid(name, u64::from(k.div_ceil(32)) * u64::from(m))?,
            },
            Op::RmsNormGrad {
                x,
                weight,
                dy,
                dx,
                rows,
                dim,
                eps,
            } => Dispatch {
                family: "rmsnorm",
                entry: "rmsnorm_grad",
                overrides: vec![],
                bindings: vec![(1, x), (2, weight), (3, dx), (4, dy)],
                params: vec![rows, dim, eps.to_bits()],
                groups: self.grid(name, u64::from(rows))?,
            },
            Op::AttentionGrad {
                q,
                k,
                v,
                out,
                dout,
                dq,
                dk,
                dv,
                stats,
                n_tokens,
                n_heads,
                n_kv_heads,
                head_dim,
                scale,
            } => {
                let params = vec![n_tokens, n_heads, n_kv_heads, head_dim, scale.to_bits()];
                self.dispatch(Dispatch {
                    family: "attention_grad",
                    entry: "attention_grad_q",
                    overrides: vec![],
                    bindings: vec![
                        (1, q),
                        (2, k),
                        (3, v),
                        (4, out),
                        (5, dout),
                        (6, dq),
                        (9, stats),
                    ],
                    params: params.clone(),
                    groups: self.grid(name, u64::from(n_tokens) * u64::from(n_heads))?,
                })?;
                Dispatch {
                    family: "attention_grad",
                    entry: "attention_grad_kv",
                    overrides: vec![],
                    bindings: vec![
                        (1, q),
                        (2, k),
                        (3, v),
                        (5, dout),
                        (7, dk),
                        (8, dv),
                        (10, stats),
                    ],
                    params,
                    groups: self.grid(name, u64::from(n_tokens) * u64::from(n_kv_heads))?,
                }
            }
            Op::SwiGluGrad {
                gate,
                up,
                dy,
                dgate,
                dup,
                n,
            } => Dispatch {
                family: "elementwise",
                entry: "swiglu_grad",
                overrides: vec![],
                bindings: vec![(1, gate), (2, up), (3, dgate), (4, dy), (5, dup)],
                params: vec![n],
                groups: self.grid(name, u64::from(n))?,
            },
            Op::CrossEntropy {
                logits,
                targets,
                loss,
                dlogits,
                rows,
                vocab,
                scale,
            } => Dispatch {
                family: "softmax",
                entry: "cross_entropy",
                overrides: vec![],
                bindings: vec![(1, logits), (2, dlogits), (4, targets), (5, loss)],
                params: vec![rows, vocab, scale.to_bits()],
                groups: self.grid_of(name, u64::from(rows) * u64::from(CE_WG), CE_WG)?,
            },
            Op::ColDot {
                a,
                b,
                out,
                rows,
                cols,
            } => Dispatch {
                family: "elementwise",
                entry: "col_dot",
                overrides: vec![],
                bindings: vec![(1, a), (2, b), (3, out)],
                params: vec![rows, 0, cols],
                groups: self.grid(name, u64::from(cols))?,
            },
            Op::Axpy { x, y, n, alpha } => Dispatch {
                family: "elementwise",
                entry: "axpy",
                overrides: vec![],
                bindings: vec![(1, x), (3, y)],
                params: vec![n, alpha.to_bits()],
                groups: self.grid(name, u64::from(n))?,
            },
            Op::AdamW {
                param,
                grad,
                m,
                v,
                n,
                hyper: h,
            } => Dispatch {
                family: "optim",
                entry: "adamw",
                overrides: vec![],
                bindings: vec![(1, grad), (2, param), (3, m), (4, v)],
                params: [
                    h.lr,
                    h.beta1,
                    h.beta2,
                    h.eps,
                    h.weight_decay,
                    h.bias1,
                    h.bias2_sqrt,
                    h.grad_scale,
                ]
                .iter()
                .fold(vec![n], |mut w, v| {
                    w.push(v.to_bits());
                    w
                }),
                groups: self.grid(name, u64::from(n))?,
            },
            Op::Sgd {
                param,
                grad,
                buf,
                n,
                lr,
                momentum,
                weight_decay,
                grad_scale,
            } => Dispatch {
                family: "optim",
                entry: "sgd",
                overrides: vec![],
                bindings: vec![(1, grad), (2, param), (3, buf)],
                params: [lr, momentum, 0.0, 0.0, weight_decay, 1.0, 1.0, grad_scale]
                    .iter()
                    .fold(vec![n], |mut w, v| {
                        w.push(v.to_bits());
                        w
                    }),
                groups: self.grid(name, u64::from(n))?,
            },
        };
        match *op {
            Op::RopeKv {
                k_cache,
                v_cache,
                n_kv_heads,
                head_dim,
                pos0,
                ..
            } => {
                let row = u64::from(n_kv_heads) * u64::from(head_dim) * 4;
                self.keeping_kv_mirrors([k_cache, v_cache], row, pos0, || self.dispatch(d))
            }
            _ => self.dispatch(d),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writable_bindings_are_read_from_the_shaders() {
        let family = |name: &str| {
            let src = SHADERS.iter().find(|(f, _)| *f == name).map(|(_, s)| *s);
            writable_bindings(src.unwrap_or_default())
        };
        // RopeKv writes q_out and both caches; attention only its output.
        assert_eq!(family("rope"), 1 << 3 | 1 << 6 | 1 << 7);
        assert_eq!(family("attention_sg"), 1 << 8 | 1 << 9);
        // A declaration this does not parse makes every binding writable.
        let odd = "@group(0) @binding(2)\nvar<storage, read_write> o: array<f32>;";
        assert_eq!(writable_bindings(odd), u32::MAX);
        let high = "@group(0) @binding(40) var<storage, read_write> o: array<f32>;";
        assert_eq!(writable_bindings(high), u32::MAX);
    }

    #[test]
    fn x_uniform_bytes_are_the_shaders_uniform_arrays() {
        let src = SHADERS
            .iter()
            .find(|(f, _)| *f == "quant_sg")
            .map(|(_, s)| *s);
        let vec4s = src.unwrap_or_default().lines().find_map(|l| {
            let v = l.strip_prefix("const X_UNIFORM_VEC4S: u32 = ")?;
            v.strip_suffix("u;")?.parse::<u64>().ok()
        });
        assert_eq!(vec4s.map(|v| v * 16), Some(X_UNIFORM_BYTES));
    }
}
