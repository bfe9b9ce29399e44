// CPU backend of fastprompt::embed_concat (C++/OpenMP), and the op schemas:
// this file is compiled in every build, so it owns TORCH_LIBRARY.
//
// Forward writes each output row once: gather (or prompt row) -> optional
// LayerNorm with fp32 statistics -> store. The unfused torch path
// materialises the gathered tokens, the concatenation and the LayerNorm
// output, i.e. three passes over [B, P+T, H]; this is one. With LayerNorm
// the P prompt rows are normalised once and copied into the other items.
//
// Backward relies on two facts: LayerNorm's input gradient is linear in the
// output gradient, and the P prompt rows are identical across the batch. So
// grad_out is first summed over the batch (fp32) and one LayerNorm backward
// per prompt row yields grad_prompt, with no [B, P, H] temporary. grad_prompt
// is the only gradient: the table and the LayerNorm parameters are frozen
// (fastprompt/ops/frozen.py refuses them requiring grad), so token rows are
// never read.
//
// Threads: every parallel region asks for at::get_num_threads(), so
// torch.set_num_threads governs this library exactly as it governs torch. The
// library links libgomp by soname and therefore shares the OpenMP runtime the
// torch wheel has already loaded.

#include "embed_concat.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace fastprompt {
namespace {

// Below this many touched elements an OpenMP fork/join costs more than the work.
constexpr int64_t kMinParallelElements = 1 << 16;
// Columns per task in column-parallel loops: whole cache lines of every row,
// and still enough tasks (8 at H = 2048) to share among a few threads.
constexpr int64_t kColumnBlock = 256;

int team_size(int64_t touched_elements) {
  return touched_elements >= kMinParallelElements ? at::get_num_threads() : 1;
}

int64_t column_block_count(int64_t hidden) { return (hidden + kColumnBlock - 1) / kColumnBlock; }

// Output row `row` of the flattened [B * (P+T), H] result comes from the
// prompt or from the table; rows are laid out item by item.
template <typename scalar_t>
const scalar_t* source_row(int64_t row, const EmbedConcatSizes& sizes, const int64_t* ids,
                           const scalar_t* table, const scalar_t* prompt) {
  const int64_t item = row / sizes.rows_per_item();
  const int64_t position = row % sizes.rows_per_item();
  if (position < sizes.prompt_rows) return prompt + position * sizes.hidden;
  return table + ids[item * sizes.tokens + position - sizes.prompt_rows] * sizes.hidden;
}

// fp32/fp64 rows are used in place; 16-bit rows are widened once into
// `scratch`, so the statistics and normalisation passes read L1-resident
// accumulate-type values instead of converting three times. Always inlined,
// like lane_sum below, so that it takes its caller's instruction set.
template <typename scalar_t, typename acc_t>
[[gnu::always_inline]] inline const acc_t* widen_row(const scalar_t* row, [[maybe_unused]] int64_t hidden,
                                                     [[maybe_unused]] acc_t* scratch) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return row;
  } else {
#pragma omp simd
    for (int64_t h = 0; h < hidden; ++h) scratch[h] = static_cast<acc_t>(row[h]);
    return scratch;
  }
}

// Sum of term(0) .. term(n-1) kept in kLanes independent partial sums. With
// a single vector accumulator each pass over a row would be bound by the
// FP-add latency, not throughput; 32 lanes are 8 SSE / 4 AVX / 2 AVX-512
// chains of fp32, enough to hide it at any of those widths.
constexpr int64_t kLanes = 32;

// Always inlined so that it is compiled for the ISA of its caller's clone
// (see FASTPROMPT_ISA_CLONES), not called at the baseline ISA.
template <typename acc_t, typename Term>
[[gnu::always_inline]] inline acc_t lane_sum(int64_t n, Term term) {
  acc_t partial[kLanes] = {};
  int64_t h = 0;
  for (; h + kLanes <= n; h += kLanes) {
#pragma omp simd
    for (int64_t lane = 0; lane < kLanes; ++lane) partial[lane] += term(h + lane);
  }
  acc_t total = 0;
  for (; h < n; ++h) total += term(h);
  for (int64_t lane = 0; lane < kLanes; ++lane) total += partial[lane];
  return total;
}

// The two row means in LayerNorm's input gradient
//   dx = rstd * (g*gamma - mean(g*gamma) - xhat * mean(g*gamma*xhat)).
template <typename acc_t>
void layer_norm_grad_means(const acc_t* grad, const acc_t* x, acc_t mean, acc_t rstd, const acc_t* gamma,
                           int64_t hidden, acc_t& mean_grad, acc_t& mean_grad_xhat) {
  const acc_t count = static_cast<acc_t>(hidden);
  mean_grad = lane_sum<acc_t>(hidden, [grad, gamma](int64_t h) { return grad[h] * gamma[h]; }) / count;
  mean_grad_xhat = lane_sum<acc_t>(hidden, [grad, gamma, x, mean, rstd](int64_t h) {
                     return grad[h] * gamma[h] * (x[h] - mean) * rstd;
                   }) /
                   count;
}

// The forward's per-row work, built twice by GCC on x86-64: for the baseline
// ISA and for x86-64-v3 (AVX2, FMA, F16C), picked once at load time through
// an ifunc. At H = 2048 the LayerNorm passes over an L1-resident row are
// compute-bound at SSE2 width, while -march=native would tie the library to
// the build machine.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTPROMPT_ISA_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FASTPROMPT_ISA_CLONES
#endif

// Statistics take two passes over the L1-resident row (mean, then centred
// squares): as accurate as Welford's update, and both passes vectorise.
template <typename scalar_t, typename acc_t>
FASTPROMPT_ISA_CLONES void layer_norm_row(const scalar_t* src, int64_t hidden, const acc_t* gamma, const acc_t* beta,
                                          double eps, acc_t* scratch, scalar_t* dst, acc_t& mean, acc_t& rstd) {
  const acc_t* x = widen_row(src, hidden, scratch);
  const acc_t count = static_cast<acc_t>(hidden);
  const acc_t row_mean = lane_sum<acc_t>(hidden, [x](int64_t h) { return x[h]; }) / count;
  const acc_t squares = lane_sum<acc_t>(hidden, [x, row_mean](int64_t h) {
    const acc_t centred = x[h] - row_mean;
    return centred * centred;
  });
  const acc_t row_rstd = acc_t(1) / std::sqrt(squares / count + static_cast<acc_t>(eps));
  mean = row_mean;
  rstd = row_rstd;
#pragma omp simd
  for (int64_t h = 0; h < hidden; ++h) {
    dst[h] = static_cast<scalar_t>((x[h] - row_mean) * row_rstd * gamma[h] + beta[h]);
  }
}

template <typename scalar_t, typename acc_t>
void forward_rows(const int64_t* ids, const scalar_t* table, const scalar_t* prompt, const acc_t* gamma,
                  const acc_t* beta, double eps, const EmbedConcatSizes& sizes, scalar_t* out, acc_t* mean,
                  acc_t* rstd) {
  const int64_t hidden = sizes.hidden;
  const int64_t rows = sizes.batch * sizes.rows_per_item();
  const bool layer_norm = gamma != nullptr;
  // With LayerNorm, item 0's prompt rows are normalised first and the other
  // items copy them (P rows of LayerNorm instead of B*P).
  const bool normalise_prompt_once = layer_norm && sizes.batch > 0;
#pragma omp parallel num_threads(team_size(rows * hidden))
  {
    std::vector<acc_t> scratch(std::is_same_v<scalar_t, acc_t> || !layer_norm ? 0 : hidden);
    if (normalise_prompt_once) {
#pragma omp for schedule(static)
      for (int64_t row = 0; row < sizes.prompt_rows; ++row) {
        layer_norm_row(prompt + row * hidden, hidden, gamma, beta, eps, scratch.data(), out + row * hidden,
                       mean[row], rstd[row]);
      }
    }
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t position = row % sizes.rows_per_item();
      scalar_t* dst = out + row * hidden;
      if (position < sizes.prompt_rows && normalise_prompt_once) {
        if (row == position) continue;  // item 0: written above
        std::memcpy(dst, out + position * hidden, hidden * sizeof(scalar_t));
        mean[row] = mean[position];
        rstd[row] = rstd[position];
      } else if (layer_norm) {
        layer_norm_row(source_row(row, sizes, ids, table, prompt), hidden, gamma, beta, eps, scratch.data(), dst,
                       mean[row], rstd[row]);
      } else {
        std::memcpy(dst, source_row(row, sizes, ids, table, prompt), hidden * sizeof(scalar_t));
      }
    }
  }
}

// summed[p] = sum_b grad_out[b, p]: parallel over (prompt row, column block)
// so that even P = 1 keeps every thread busy.
template <typename scalar_t, typename acc_t>
void sum_prompt_grad_over_batch(const scalar_t* grad_out, const EmbedConcatSizes& sizes, acc_t* summed) {
  const int64_t hidden = sizes.hidden;
  const int64_t blocks = column_block_count(hidden);
  const int64_t tasks = sizes.prompt_rows * blocks;
#pragma omp parallel for num_threads(team_size(sizes.batch * sizes.prompt_rows * hidden)) schedule(static)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t prompt_row = task / blocks;
    const int64_t begin = (task % blocks) * kColumnBlock;
    const int64_t width = std::min(kColumnBlock, hidden - begin);
    acc_t* dst = summed + prompt_row * hidden + begin;
    for (int64_t item = 0; item < sizes.batch; ++item) {
      const scalar_t* src = grad_out + (item * sizes.rows_per_item() + prompt_row) * hidden + begin;
#pragma omp simd
      for (int64_t h = 0; h < width; ++h) dst[h] += static_cast<acc_t>(src[h]);
    }
  }
}

// LayerNorm backward of the P prompt rows, fed the batch-summed gradient.
// Prompt statistics are read from batch item 0: every item holds the same.
template <typename scalar_t, typename acc_t>
void prompt_layer_norm_backward(const acc_t* summed, const scalar_t* prompt, const acc_t* mean,
                                const acc_t* rstd, const acc_t* gamma, const EmbedConcatSizes& sizes,
                                acc_t* grad_prompt) {
  const int64_t hidden = sizes.hidden;
#pragma omp parallel num_threads(team_size(sizes.prompt_rows * hidden))
  {
    std::vector<acc_t> scratch(std::is_same_v<scalar_t, acc_t> ? 0 : hidden);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < sizes.prompt_rows; ++row) {
      const acc_t* grad = summed + row * hidden;
      const acc_t* x = widen_row(prompt + row * hidden, hidden, scratch.data());
      const acc_t row_mean = mean[row];
      const acc_t row_rstd = rstd[row];
      acc_t mean_grad;
      acc_t mean_grad_xhat;
      layer_norm_grad_means(grad, x, row_mean, row_rstd, gamma, hidden, mean_grad, mean_grad_xhat);
      acc_t* dst = grad_prompt + row * hidden;
#pragma omp simd
      for (int64_t h = 0; h < hidden; ++h) {
        const acc_t xhat = (x[h] - row_mean) * row_rstd;
        dst[h] = row_rstd * (grad[h] * gamma[h] - mean_grad - xhat * mean_grad_xhat);
      }
    }
  }
}

// int64, contiguous, and in range: checked here, serially, because an
// exception must not escape an OpenMP region.
at::Tensor checked_token_ids(const at::Tensor& input_ids, int64_t vocab) {
  at::Tensor ids = input_ids.to(at::kLong).contiguous();
  const int64_t* data = ids.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    TORCH_CHECK(data[i] >= 0 && data[i] < vocab, "embed_concat: token id ", data[i], " outside the table [0, ",
                vocab, ")");
  }
  return ids;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embed_concat_fwd_cpu(
    const at::Tensor& input_ids, const at::Tensor& weight, const at::Tensor& prompt,
    const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias, double eps) {
  const EmbedConcatSizes sizes = check_embed_concat_inputs(input_ids, weight, prompt, ln_weight, ln_bias);
  const bool layer_norm = ln_weight.has_value();
  const at::Tensor ids = checked_token_ids(input_ids, sizes.vocab);
  const at::Tensor table = weight.contiguous();
  const at::Tensor prompt_rows = prompt.to(weight.scalar_type()).contiguous();
  at::Tensor gamma;
  at::Tensor beta;
  if (layer_norm) std::tie(gamma, beta) = layer_norm_params(*ln_weight, ln_bias, accumulate_dtype(weight.scalar_type()));
  at::Tensor out;
  at::Tensor mean;
  at::Tensor rstd;
  std::tie(out, mean, rstd) = allocate_forward_outputs(weight, sizes, layer_norm);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "embed_concat_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_rows<scalar_t, acc_t>(ids.const_data_ptr<int64_t>(), table.const_data_ptr<scalar_t>(),
                                  prompt_rows.const_data_ptr<scalar_t>(),
                                  layer_norm ? gamma.const_data_ptr<acc_t>() : nullptr,
                                  layer_norm ? beta.const_data_ptr<acc_t>() : nullptr, eps, sizes,
                                  out.mutable_data_ptr<scalar_t>(),
                                  layer_norm ? mean.mutable_data_ptr<acc_t>() : nullptr,
                                  layer_norm ? rstd.mutable_data_ptr<acc_t>() : nullptr);
  });
  return {out, mean, rstd};
}

at::Tensor embed_concat_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& input_ids, const at::Tensor& weight,
                                const at::Tensor& prompt, const std::optional<at::Tensor>& ln_weight,
                                const at::Tensor& mean, const at::Tensor& rstd) {
  const EmbedConcatSizes sizes = check_embed_concat_inputs(input_ids, weight, prompt, ln_weight, std::nullopt);
  const bool layer_norm = ln_weight.has_value();
  const at::ScalarType acc_dtype = accumulate_dtype(weight.scalar_type());
  check_embed_concat_backward_inputs(grad_out, mean, rstd, sizes, layer_norm, acc_dtype);

  // Zero-initialised, so an empty batch (no statistics rows, nothing to
  // launch) yields a zero gradient.
  const auto acc_options = weight.options().dtype(acc_dtype);
  at::Tensor summed = at::zeros({sizes.prompt_rows, sizes.hidden}, acc_options);
  at::Tensor grad_prompt = layer_norm ? at::zeros_like(summed) : summed;

  if (sizes.batch > 0) {
    const at::Tensor grad = grad_out.to(weight.scalar_type()).contiguous();
    const at::Tensor prompt_rows = prompt.to(weight.scalar_type()).contiguous();
    const at::Tensor gamma = layer_norm ? ln_weight->to(acc_dtype).contiguous() : at::Tensor();
    const at::Tensor row_mean = mean.contiguous();
    const at::Tensor row_rstd = rstd.contiguous();

    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "embed_concat_bwd_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      sum_prompt_grad_over_batch(grad.const_data_ptr<scalar_t>(), sizes, summed.mutable_data_ptr<acc_t>());
      if (layer_norm) {
        prompt_layer_norm_backward(summed.const_data_ptr<acc_t>(), prompt_rows.const_data_ptr<scalar_t>(),
                                   row_mean.const_data_ptr<acc_t>(), row_rstd.const_data_ptr<acc_t>(),
                                   gamma.const_data_ptr<acc_t>(), sizes, grad_prompt.mutable_data_ptr<acc_t>());
      }
    });
  }
  return grad_prompt.to(prompt.scalar_type());
}

}  // namespace

TORCH_LIBRARY(fastprompt, m) {
  m.def(
      "embed_concat_fwd(Tensor input_ids, Tensor weight, Tensor prompt, Tensor? ln_weight, Tensor? ln_bias, "
      "float eps) -> (Tensor out, Tensor mean, Tensor rstd)");
  m.def(
      "embed_concat_bwd(Tensor grad_out, Tensor input_ids, Tensor weight, Tensor prompt, Tensor? ln_weight, "
      "Tensor mean, Tensor rstd) -> Tensor grad_prompt");
}

TORCH_LIBRARY_IMPL(fastprompt, CPU, m) {
  m.impl("embed_concat_fwd", &embed_concat_fwd_cpu);
  m.impl("embed_concat_bwd", &embed_concat_bwd_cpu);
}

}  // namespace fastprompt
