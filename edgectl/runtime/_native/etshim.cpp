// edgectl's native shim over ExecuTorch's runtime library: with it, the runtime runs
// programs from plain memory (numpy arrays), without torch or the Python binding.
//
// Why: the binding holds the GIL inside load_program/load_method/execute, so a loader
// thread and an executor thread never overlap. These plain C functions are called
// through ctypes, which releases the GIL for the whole call: a shard loads on one
// thread while another executes, really in parallel.
//
// It links against the wheel's _portable_lib*.so (same SONAME, so the dynamic loader
// reuses the copy already loaded, by ctypes or by the Python binding: one kernel/backend
// registry, one thread pool) and uses only symbols that library exports plus
// header-inline code: Program::load, Program::load_method, Method::execute,
// Method::mutable_input, Method::get_output, internal::resize_tensor_impl, runtime_init,
// the thread pool's get_threadpool. Inputs are the method's own input
// tensors re-pointed at the caller's memory (exported with alloc_graph_input=False),
// so nothing is copied in; outputs are copied into caller buffers.

#include <executorch/runtime/backend/backend_options_map.h>
#include <executorch/runtime/backend/options.h>
#include <executorch/runtime/platform/platform.h>
#include <executorch/runtime/platform/runtime.h>
#include <executorch/runtime/core/data_loader.h>
#include <executorch/runtime/core/hierarchical_allocator.h>
#include <executorch/runtime/core/memory_allocator.h>
#include <executorch/runtime/core/exec_aten/exec_aten.h>
#include <executorch/runtime/executor/memory_manager.h>
#include <executorch/runtime/executor/method.h>
#include <executorch/runtime/executor/program.h>

#include <dlfcn.h>
#include <fcntl.h>
#include <malloc.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

namespace etr = executorch::runtime;
using etr::Error;
using etr::FreeableBuffer;
using etr::Result;

// The thread pool's exported members (its header needs pthreadpool.h, which the wheel
// does not ship): declared here, called through pointers only.
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  size_t get_thread_count() const;
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

namespace executorch::runtime::internal {
Error resize_tensor_impl(etensor::TensorImpl* impl, ArrayRef<int32_t> new_sizes);
}

namespace {

// Whole file mapped read-only; segments are views into it (page cache backed).
class MmapLoader final : public etr::DataLoader {
 public:
  static MmapLoader* open(const char* path, bool readahead, char* err, size_t errlen) {
    int fd = ::open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      snprintf(err, errlen, "cannot open %s", path);
      return nullptr;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_size == 0) {
      ::close(fd);
      snprintf(err, errlen, "cannot stat %s", path);
      return nullptr;
    }
    void* p = mmap(nullptr, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    ::close(fd);
    if (p == MAP_FAILED) {
      snprintf(err, errlen, "cannot map %s", path);
      return nullptr;
    }
    if (readahead) madvise(p, st.st_size, MADV_WILLNEED);  // start readahead for the whole file at once
    return new MmapLoader(p, st.st_size);
  }
  ~MmapLoader() override { munmap(base_, size_); }

  Result<FreeableBuffer> load(size_t offset, size_t size, const SegmentInfo&) const override {
    if (offset + size > size_) return Error::InvalidArgument;
    return FreeableBuffer(static_cast<const uint8_t*>(base_) + offset, size, nullptr);
  }
  Result<size_t> size() const override { return size_; }

  // Unmap the pages touched so far (they stay in the page cache, unmapped, where the kernel
  // reclaims them easily); what is read again later faults back in from the file. Called
  // once a method is loaded: XNNPACK has packed its weights into its own memory by then,
  // and mapped file pages kept by every resident shard were what a memory cgroup could not
  // reclaim in time.
  void release_pages() const { madvise(base_, size_, MADV_DONTNEED); }

 private:
  MmapLoader(void* base, size_t size) : base_(base), size_(size) {}
  void* base_;
  size_t size_;
};

// Method allocator backed by malloc; everything freed with the shard.
class MallocAllocator final : public etr::MemoryAllocator {
 public:
  MallocAllocator() : MemoryAllocator(0, nullptr) {}
  ~MallocAllocator() override { reset(); }
  void* allocate(size_t size, size_t alignment) override {
    void* p = nullptr;
    if (alignment < sizeof(void*)) alignment = sizeof(void*);
    if (posix_memalign(&p, alignment, size ? size : 1) != 0) return nullptr;
    blocks_.push_back(p);
    return p;
  }
  void reset() override {
    for (void* p : blocks_) free(p);
    blocks_.clear();
  }

 private:
  std::vector<void*> blocks_;
};

// Temp allocator: the runtime resets it after every instruction, and kernels (custom_sdpa,
// the quantized linears) ask it for scratch on every call. Freeing and allocating that
// scratch each time cost a fresh mapping and its page faults per call (blocks above the
// mmap threshold): the blocks are kept instead, the i-th request after a reset reusing
// the i-th block when it is large enough. Freed with the shard.
class ReusingAllocator final : public etr::MemoryAllocator {
 public:
  ReusingAllocator() : MemoryAllocator(0, nullptr) {}
  ~ReusingAllocator() override {
    for (auto& b : blocks_) free(b.first);
  }
  void* allocate(size_t size, size_t alignment) override {
    if (alignment < sizeof(void*)) alignment = sizeof(void*);
    if (alignment > 64) return nullptr;  // blocks are 64-byte aligned
    size = size ? size : 1;
    if (used_ < blocks_.size() && blocks_[used_].second >= size) return blocks_[used_++].first;
    void* p = nullptr;
    if (posix_memalign(&p, 64, size) != 0) return nullptr;
    if (used_ < blocks_.size()) {
      free(blocks_[used_].first);
      blocks_[used_] = {p, size};
    } else {
      blocks_.emplace_back(p, size);
    }
    ++used_;
    return p;
  }
  void reset() override { used_ = 0; }

 private:
  std::vector<std::pair<void*, size_t>> blocks_;
  size_t used_ = 0;
};

struct Shard {
  std::unique_ptr<MmapLoader> loader;
  std::unique_ptr<etr::Program> program;
  std::vector<std::unique_ptr<uint8_t, decltype(&free)>> planned;  // calloc'd: pages cost only once used
  std::vector<etr::Span<uint8_t>> spans;
  std::unique_ptr<etr::HierarchicalAllocator> planned_alloc;
  MallocAllocator method_alloc;
  ReusingAllocator temp_alloc;
  std::unique_ptr<etr::MemoryManager> memory;
  std::unique_ptr<etr::Method> method;
  size_t planned_bytes = 0;
};

size_t element_size(etr::etensor::ScalarType t) {
  switch (static_cast<int>(t)) {
    case 0: case 1: case 11: return 1;  // Byte, Char, Bool
    case 2: case 5: case 15: return 2;  // Short, Half, BFloat16
    case 3: case 6: return 4;           // Int, Float
    case 4: case 7: return 8;           // Long, Double
    default: return 0;
  }
}

// ExecuTorch's log hook (the PAL's emit_log_message), filtered: the packed-weight cache
// logs two "flock(...) failed (errno=11)" errors and an info line on every cached load
// (~90 lines per token), harmless (its exclusive lock, wanted for appending, is refused
// while the file is mapped under a shared one; the load is served from the file all the
// same) and written straight to fd 2 from whichever thread loads. The hook is
// process-wide and keyed on the source file only: nothing else written to fd 2 is
// touched, whichever thread writes it. Everything else goes to the previous hook.
pal_emit_log_message_method g_prev_emit = nullptr;
std::atomic<long> g_dropped{0};
std::atomic<long> g_errors{0};  // error-level cache messages other than the flock ones

// Also dropped: "No temp allocator provided", which the LLM custom ops' eager (torch) kernels
// log on every call (they run ExecuTorch's kernel without a temp allocator and allocate
// their own scratch): the eager model calls llama::custom_sdpa in every layer.
// And the thread pool's CPU probing ("Reading file /sys/devices/soc0/image_version", ...,
// from cpuinfo_utils.cpp), logged when the pool starts, wherever that happens.
void filtered_emit(et_timestamp_t ts, et_pal_log_level_t level, const char* filename, const char* function, size_t line,
                   const char* message, size_t length) {
  if (filename && (strstr(filename, "cpuinfo_utils.cpp") ||
                   (strstr(filename, "kernel_runtime_context.h") && message &&
                    strncmp(message, "No temp allocator provided", 26) == 0))) {
    g_dropped.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  if (filename && strstr(filename, "XNNWeightsCache")) {
    g_dropped.fetch_add(1, std::memory_order_relaxed);
    if ((level == kError || level == kFatal) && !(message && strncmp(message, "flock(", 6) == 0))
      g_errors.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  if (g_prev_emit) g_prev_emit(ts, level, filename, function, line, message, length);
}

// The same filter over another library's own copy of the PAL (the LLM custom-op library
// carries one): its previous hook.
pal_emit_log_message_method g_prev_emit_lib = nullptr;

void filtered_emit_lib(et_timestamp_t ts, et_pal_log_level_t level, const char* filename, const char* function,
                       size_t line, const char* message, size_t length) {
  if (filename && strstr(filename, "kernel_runtime_context.h") && message &&
      strncmp(message, "No temp allocator provided", 26) == 0) {
    g_dropped.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  if (g_prev_emit_lib) g_prev_emit_lib(ts, level, filename, function, line, message, length);
}

}  // namespace

#pragma GCC visibility push(default)
extern "C" {

// Initialise the runtime (its platform layer), as the Python binding does when imported.
// Idempotent; called once when the runtime library is loaded without the binding.
void ets_init() { etr::runtime_init(); }

// Threads of ExecuTorch's pool (XNNPACK and the optimized kernels share it): resize it
// to n (0 on success), or report its size.
int ets_set_threads(int n) {
  auto* pool = executorch::extension::threadpool::get_threadpool();
  return pool && n > 0 && pool->_unsafe_reset_threadpool(static_cast<uint32_t>(n)) ? 0 : -1;
}
int ets_thread_count() {
  auto* pool = executorch::extension::threadpool::get_threadpool();
  return pool ? static_cast<int>(pool->get_thread_count()) : 0;
}

// Total planned (activation) memory of a method, or -1; maps the file, loads nothing.
int64_t ets_planned_size(const char* path, const char* method_name) {
  char err[256];
  std::unique_ptr<MmapLoader> loader(MmapLoader::open(path, false, err, sizeof err));
  if (!loader) return -1;
  auto prog = etr::Program::load(loader.get(), etr::Program::Verification::Minimal);
  if (!prog.ok()) return -1;
  auto meta = prog->method_meta(method_name);
  if (!meta.ok()) return -1;
  int64_t total = 0;
  for (size_t i = 0; i < meta->num_memory_planned_buffers(); ++i) {
    total += (meta->memory_planned_buffer_size(i).get() + 63) / 64 * 64;
  }
  return total;
}

// Load `method_name` of the program at `path`. Returns a handle or null (message in err).
// With `arena` (arena_size bytes), the method's planned memory is placed there instead of
// its own allocation: shards run one at a time, so they can all share one arena.
// With `own_workspace`, the method's XNNPACK delegates get a workspace of their own
// (sharing mode PerModel) instead of the process-wide one. XNNPACK holds the workspace's
// lock for the whole of a delegate's init (weight packing) and of each execute, so a
// shard loading into the shared workspace stalls every resident shard's compute; a
// streamed shard loads into its own and the two really run at once.
//
// With a non-empty `cache_path`, XNNPACK's packed-weight cache is enabled for this load
// (runtime options weight_cache_enabled and packed_cache_path, next to the sharing mode):
// a first load packs the weights into that file (the backend msyncs it and writes its
// index before load_method returns), later loads map it and skip the packing. One file
// per program: the backend keeps one cache object (and one lock) per path. Null or ""
// means no cache. The caller decides when a file is complete (see edgectl/packed_cache.py).
// flags: bit 0 own XNNPACK workspace; bit 1 no readahead of the whole file (when a packed
// cache holds this program's weights its raw constants are never read: only the pages its
// metadata sits on fault in).
void* ets_load(const char* path, const char* method_name, void* arena, size_t arena_size, int flags,
               const char* cache_path, char* err, size_t errlen) {
  const int own_workspace = flags & 1;
  auto s = std::make_unique<Shard>();
  s->loader.reset(MmapLoader::open(path, !(flags & 2), err, errlen));
  if (!s->loader) return nullptr;
  auto prog = etr::Program::load(s->loader.get(), etr::Program::Verification::Minimal);
  if (!prog.ok()) {
    snprintf(err, errlen, "Program::load failed (error 0x%x)", static_cast<unsigned>(prog.error()));
    return nullptr;
  }
  s->program = std::make_unique<etr::Program>(std::move(prog.get()));
  auto meta = s->program->method_meta(method_name);
  if (!meta.ok()) {
    snprintf(err, errlen, "no method %s", method_name);
    return nullptr;
  }
  size_t n = meta->num_memory_planned_buffers();
  size_t need = 0;
  for (size_t i = 0; i < n; ++i) need += (meta->memory_planned_buffer_size(i).get() + 63) / 64 * 64;
  if (arena && need > arena_size) {
    snprintf(err, errlen, "planned memory of %zu bytes exceeds the shared arena (%zu)", need, arena_size);
    return nullptr;
  }
  size_t off = 0;
  if (!arena) s->planned.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    size_t sz = static_cast<size_t>(meta->memory_planned_buffer_size(i).get());
    uint8_t* base;
    if (arena) {
      base = static_cast<uint8_t*>(arena) + off;
      off += (sz + 63) / 64 * 64;
    } else {
      s->planned.emplace_back(static_cast<uint8_t*>(calloc(sz ? sz : 1, 1)), &free);
      if (!s->planned.back()) {
        snprintf(err, errlen, "cannot allocate %zu bytes of planned memory", sz);
        return nullptr;
      }
      s->planned_bytes += sz;
      base = s->planned.back().get();
    }
    s->spans.emplace_back(base, sz);
  }
  s->planned_alloc = std::make_unique<etr::HierarchicalAllocator>(
      etr::Span<etr::Span<uint8_t>>(s->spans.data(), s->spans.size()));
  s->memory = std::make_unique<etr::MemoryManager>(&s->method_alloc, s->planned_alloc.get(), &s->temp_alloc);
  etr::BackendOptions<3> xnn_opts;
  etr::LoadBackendOptionsMap opts_map;
  bool cached = cache_path && cache_path[0];
  if (cached && strlen(cache_path) >= 255) {  // an option value holds at most 255 characters
    snprintf(err, errlen, "packed-weight cache path too long (%zu characters)", strlen(cache_path));
    return nullptr;
  }
  if (own_workspace) {
    static const char kSharingMode[] = "workspace_sharing_mode";  // executorch::backends::xnnpack
    xnn_opts.set_option(kSharingMode, 1);                          // WorkspaceSharingMode::PerModel
  }
  if (cached) {
    static const char kWeightCache[] = "weight_cache_enabled";  // xnnpack::weight_cache_option_key
    static const char kCachePath[] = "packed_cache_path";       // xnnpack::packed_cache_path_option_key
    xnn_opts.set_option(kWeightCache, true);
    xnn_opts.set_option(kCachePath, cache_path);  // copied into the option
  }
  bool any = own_workspace || cached;
  if (any) opts_map.set_options("XnnpackBackend", xnn_opts.view());
  auto m = s->program->load_method(method_name, s->memory.get(), nullptr, nullptr, any ? &opts_map : nullptr);
  if (!m.ok()) {
    snprintf(err, errlen, "load_method(%s) failed (error 0x%x)", method_name, static_cast<unsigned>(m.error()));
    return nullptr;
  }
  s->method = std::make_unique<etr::Method>(std::move(m.get()));
  s->loader->release_pages();
  return s.release();
}

// Install the filtered log hook (once; later calls do nothing). Returns 1 if installed.
int ets_quiet_weight_cache_log() {
  if (g_prev_emit) return 1;
  const etr::PalImpl* cur = etr::get_pal_impl();
  if (!cur || !cur->emit_log_message) return 0;
  g_prev_emit = cur->emit_log_message;
  return etr::register_pal(etr::PalImpl::create(filtered_emit, __FILE__)) ? 1 : 0;
}

// Install the filter on the PAL of an already loaded library that carries its own copy of
// ExecuTorch's platform layer (the LLM custom-op library, whose eager kernels log "No temp
// allocator provided" on every call). Returns 1 if installed (or already), 0 if the
// library is not loaded or has no PAL of its own.
int ets_quiet_library_log(const char* path) {
  if (g_prev_emit_lib) return 1;
  void* h = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
  if (!h) return 0;
  using GetPal = const etr::PalImpl* (*)();
  using RegPal = bool (*)(etr::PalImpl);
  auto get = reinterpret_cast<GetPal>(dlsym(h, "_ZN10executorch7runtime12get_pal_implEv"));
  auto reg = reinterpret_cast<RegPal>(dlsym(h, "_ZN10executorch7runtime12register_palENS0_7PalImplE"));
  int ok = 0;
  if (get && reg) {
    const etr::PalImpl* cur = get();
    if (cur && cur->emit_log_message && cur->emit_log_message != filtered_emit) {
      g_prev_emit_lib = cur->emit_log_message;
      ok = reg(etr::PalImpl::create(filtered_emit_lib, __FILE__)) ? 1 : 0;
    }
  }
  dlclose(h);  // drops only the reference taken here
  return ok;
}

// How many packed-weight cache log messages the filter has dropped, and how many of them
// were errors other than the harmless flock ones (a write that failed: disk full, ...).
long ets_weight_cache_log_dropped() { return g_dropped.load(std::memory_order_relaxed); }
long ets_weight_cache_errors() { return g_errors.load(std::memory_order_relaxed); }

int ets_num_inputs(void* h) { return static_cast<int>(static_cast<Shard*>(h)->method->inputs_size()); }
int ets_num_outputs(void* h) { return static_cast<int>(static_cast<Shard*>(h)->method->outputs_size()); }
size_t ets_planned_bytes(void* h) { return static_cast<Shard*>(h)->planned_bytes; }

// Point input i at `data` with shape `sizes` (ndim entries); run; copy each output into
// out_data[i] (out_cap[i] bytes) and its shape into out_sizes[8*i...], out_ndim[i].
// Returns 0, or an error code with a message in err.
int ets_run(void* h, int nin, void* const* in_data, const int32_t* in_ndim, const int32_t* in_sizes,
            int nout, void* const* out_data, const int64_t* out_cap, int32_t* out_sizes, int32_t* out_ndim,
            char* err, size_t errlen) {
  Shard* s = static_cast<Shard*>(h);
  etr::Method& m = *s->method;
  if (static_cast<size_t>(nin) != m.inputs_size() || static_cast<size_t>(nout) > m.outputs_size()) {
    snprintf(err, errlen, "expected %zu inputs and %zu outputs", m.inputs_size(), m.outputs_size());
    return 1;
  }
  for (int i = 0; i < nin; ++i) {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    etr::EValue& ev = m.mutable_input(i);  // deprecated in favour of set_input, which copies
#pragma GCC diagnostic pop
    if (!ev.isTensor()) {
      snprintf(err, errlen, "input %d is not a tensor", i);
      return 1;
    }
    auto* impl = ev.toTensor().unsafeGetTensorImpl();
    if (impl->dim() != in_ndim[i]) {
      snprintf(err, errlen, "input %d has %zd dims, got %d", i, impl->dim(), in_ndim[i]);
      return 1;
    }
    Error e = etr::internal::resize_tensor_impl(
        impl, etr::ArrayRef<int32_t>(in_sizes + 8 * i, static_cast<size_t>(in_ndim[i])));
    if (e != Error::Ok) {
      snprintf(err, errlen, "input %d: cannot take that shape (error 0x%x)", i, static_cast<unsigned>(e));
      return 1;
    }
    impl->set_data(in_data[i]);
  }
  Error e = m.execute();
  if (e != Error::Ok) {
    snprintf(err, errlen, "execute failed (error 0x%x)", static_cast<unsigned>(e));
    return 2;
  }
  for (int i = 0; i < nout; ++i) {
    const etr::EValue& ev = m.get_output(i);
    const auto& t = ev.toTensor();
    size_t nbytes = static_cast<size_t>(t.numel()) * element_size(t.scalar_type());
    if (static_cast<int64_t>(nbytes) > out_cap[i]) {
      snprintf(err, errlen, "output %d needs %zu bytes, buffer has %lld", i, nbytes, static_cast<long long>(out_cap[i]));
      return 1;
    }
    std::memcpy(out_data[i], t.const_data_ptr(), nbytes);
    out_ndim[i] = static_cast<int32_t>(t.dim());
    for (ssize_t d = 0; d < t.dim() && d < 8; ++d) out_sizes[8 * i + d] = t.size(d);
  }
  return 0;
}

// Point input i of m at data with the given shape (the tensor keeps its dtype).
static int point_input(etr::Method& m, int i, void* data, const int32_t* sizes, int ndim, char* err, size_t errlen) {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  etr::EValue& ev = m.mutable_input(i);
#pragma GCC diagnostic pop
  if (!ev.isTensor()) {
    snprintf(err, errlen, "input %d is not a tensor", i);
    return 1;
  }
  auto* impl = ev.toTensor().unsafeGetTensorImpl();
  if (impl->dim() != ndim) {
    snprintf(err, errlen, "input %d has %zd dims, got %d", i, impl->dim(), ndim);
    return 1;
  }
  Error e = etr::internal::resize_tensor_impl(impl, etr::ArrayRef<int32_t>(sizes, static_cast<size_t>(ndim)));
  if (e != Error::Ok) {
    snprintf(err, errlen, "input %d: cannot take that shape (error 0x%x)", i, static_cast<unsigned>(e));
    return 1;
  }
  impl->set_data(data);
  return 0;
}

// Run n loaded layer shards back to back in one call (the resident part of a forward
// pass): shard j takes (h [1,T,dim], pos [T], then the k,v caches of its n_layers[j]
// layers from `caches`, in order) and returns h, which is copied back into `h`. The
// programs write their layers' new entries into the caches themselves (positions
// start..start+T, a sliding layer's ring at slots start mod C..) and read positions
// < start+T only (shard_build.LayersProgram).
// Cache layout as edgectl.model: [1,lens[i],nkv,hd] (position-major), fp32: lens[i] is S
// for a global layer's cache, C for a sliding layer's ring (model_args.ring_len).
int ets_run_layers(int n, void* const* handles, const int32_t* n_layers, float* h, int T, int dim, int64_t* pos,
                   float* const* caches, const int32_t* lens, int nkv, int hd, int S, int start, char* err,
                   size_t errlen) {
  if (start < 0 || start + T > S) {
    snprintf(err, errlen, "positions %d..%d exceed the cache length %d", start, start + T, S);
    return 1;
  }
  const int32_t h_sizes[3] = {1, T, dim};
  const int32_t p_sizes[1] = {T};
  int c = 0;  // next cache tensor
  for (int j = 0; j < n; ++j) {
    etr::Method& m = *static_cast<Shard*>(handles[j])->method;
    int L = n_layers[j];
    if (m.inputs_size() != static_cast<size_t>(2 + 2 * L) || m.outputs_size() < 1) {
      snprintf(err, errlen, "shard %d: expected %d inputs, has %zu", j, 2 + 2 * L, m.inputs_size());
      return 1;
    }
    if (point_input(m, 0, h, h_sizes, 3, err, errlen) || point_input(m, 1, pos, p_sizes, 1, err, errlen)) return 1;
    for (int l = 0; l < 2 * L; ++l) {
      const int32_t c_sizes[4] = {1, lens[c + l], nkv, hd};
      if (lens[c + l] < T || (lens[c + l] < S && start % lens[c + l] + T > lens[c + l])) {
        snprintf(err, errlen, "positions %d..%d wrap a ring of %d slots", start, start + T, lens[c + l]);
        return 1;
      }
      if (point_input(m, 2 + l, caches[c + l], c_sizes, 4, err, errlen)) return 1;
    }
    Error e = m.execute();
    if (e != Error::Ok) {
      snprintf(err, errlen, "shard %d: execute failed (error 0x%x)", j, static_cast<unsigned>(e));
      return 2;
    }
    const auto& ho = m.get_output(0).toTensor();
    if (ho.numel() != static_cast<ssize_t>(T) * dim) {
      snprintf(err, errlen, "shard %d: h output has %zd elements, expected %d", j, ho.numel(), T * dim);
      return 1;
    }
    std::memcpy(h, ho.const_data_ptr<float>(), sizeof(float) * T * dim);  // inputs are consumed: h is free now
    c += 2 * L;
  }
  return 0;
}

// trim: hand the freed heap pages back to the OS (malloc_trim). A streamed shard is freed
// without: the next shard loads into the same pages at once (packed weights, XNNPACK
// workspace), instead of faulting in fresh ones.
void ets_free(void* h, int trim) {
  Shard* s = static_cast<Shard*>(h);
  if (!s) return;
  // Method before Program before the mapping (members destroy in reverse order anyway).
  s->method.reset();
  s->program.reset();
  delete s;
  if (trim) malloc_trim(0);
}

}  // extern "C"
#pragma GCC visibility pop
