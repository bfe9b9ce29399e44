// CPU backend of fastprompt::pack_embed (C++/OpenMP), and the op schemas:
// this file is compiled in every build, so it owns TORCH_LIBRARY.
//
// Forward writes each row of the packed sequence once, straight into the
// packed buffer: source row (a prompt row, or the table row of a kept token)
// -> optional LayerNorm with fp32 statistics -> store. The unfused torch path
// materialises the gathered tokens, the concatenation and the LayerNorm
// output, i.e. three passes over [A*P + K, H]; this is one.
//
// Backward: each prompt row appears once in the packed sequence, so its
// gradient is one LayerNorm backward of its own grad_out row, with the
// statistics the forward saved for the A*P prompt rows. grad_prompts is the
// only gradient: the table and the LayerNorm parameters are frozen
// (fastprompt/ops/frozen.py refuses them requiring grad), so token rows are
// never read.
//
// Threads: every parallel region asks for at::get_num_threads(), so
// torch.set_num_threads governs this library exactly as it governs torch. The
// library links libgomp by soname and therefore shares the OpenMP runtime the
// torch wheel has already loaded.

#include "pack_embed.h"

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

int team_size(int64_t touched_elements) {
  return touched_elements >= kMinParallelElements ? at::get_num_threads() : 1;
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

// Row `row` of the packed sequence: prompt rows first, then the kept tokens.
template <typename scalar_t>
const scalar_t* source_row(int64_t row, const PackEmbedSizes& sizes, const int64_t* ids,
                           const int64_t* token_index, const scalar_t* table, const scalar_t* prompts) {
  if (row < sizes.prompt_rows) return prompts + row * sizes.hidden;
  return table + ids[token_index[row - sizes.prompt_rows]] * sizes.hidden;
}

template <typename scalar_t, typename acc_t>
void forward_rows(const int64_t* ids, const int64_t* token_index, const scalar_t* table, const scalar_t* prompts,
                  const acc_t* gamma, const acc_t* beta, double eps, const PackEmbedSizes& sizes, scalar_t* out,
                  acc_t* mean, acc_t* rstd) {
  const int64_t hidden = sizes.hidden;
  const int64_t rows = sizes.rows();
  const bool layer_norm = gamma != nullptr;
#pragma omp parallel num_threads(team_size(rows * hidden))
  {
    std::vector<acc_t> scratch(std::is_same_v<scalar_t, acc_t> || !layer_norm ? 0 : hidden);
    // Statistics are kept for the prompt rows only: the backward needs no others.
    acc_t unused_mean;
    acc_t unused_rstd;
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const scalar_t* src = source_row(row, sizes, ids, token_index, table, prompts);
      scalar_t* dst = out + row * hidden;
      if (layer_norm) {
        const bool prompt_row = row < sizes.prompt_rows;
        layer_norm_row(src, hidden, gamma, beta, eps, scratch.data(), dst, prompt_row ? mean[row] : unused_mean,
                       prompt_row ? rstd[row] : unused_rstd);
      } else {
        std::memcpy(dst, src, hidden * sizeof(scalar_t));
      }
    }
  }
}

// LayerNorm backward of the A*P prompt rows, each fed its own grad_out row.
template <typename scalar_t, typename acc_t>
void prompt_layer_norm_backward(const scalar_t* grad_out, const scalar_t* prompts, const acc_t* mean,
                                const acc_t* rstd, const acc_t* gamma, int64_t prompt_rows, int64_t hidden,
                                acc_t* grad_prompts) {
#pragma omp parallel num_threads(team_size(prompt_rows * hidden))
  {
    const int64_t widened = std::is_same_v<scalar_t, acc_t> ? 0 : hidden;
    std::vector<acc_t> grad_scratch(widened);
    std::vector<acc_t> x_scratch(widened);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < prompt_rows; ++row) {
      const acc_t* grad = widen_row(grad_out + row * hidden, hidden, grad_scratch.data());
      const acc_t* x = widen_row(prompts + row * hidden, hidden, x_scratch.data());
      const acc_t row_mean = mean[row];
      const acc_t row_rstd = rstd[row];
      acc_t mean_grad;
      acc_t mean_grad_xhat;
      layer_norm_grad_means(grad, x, row_mean, row_rstd, gamma, hidden, mean_grad, mean_grad_xhat);
      acc_t* dst = grad_prompts + row * hidden;
#pragma omp simd
      for (int64_t h = 0; h < hidden; ++h) {
        const acc_t xhat = (x[h] - row_mean) * row_rstd;
        dst[h] = row_rstd * (grad[h] * gamma[h] - mean_grad - xhat * mean_grad_xhat);
      }
    }
  }
}

// int64 and contiguous; the kept positions inside the batch and their ids
// inside the table. Checked here, serially (K reads), because an exception
// must not escape an OpenMP region.
std::tuple<at::Tensor, at::Tensor> checked_indices(const at::Tensor& input_ids, const at::Tensor& token_index,
                                                   const PackEmbedSizes& sizes) {
  at::Tensor ids = input_ids.to(at::kLong).contiguous();
  at::Tensor index = token_index.to(at::kLong).contiguous();
  const int64_t* id_data = ids.const_data_ptr<int64_t>();
  const int64_t* index_data = index.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < sizes.kept; ++k) {
    const int64_t flat = index_data[k];
    TORCH_CHECK(flat >= 0 && flat < sizes.id_count, "pack_embed: token_index ", flat, " outside the batch [0, ",
                sizes.id_count, ")");
    TORCH_CHECK(id_data[flat] >= 0 && id_data[flat] < sizes.vocab, "pack_embed: token id ", id_data[flat],
                " outside the table [0, ", sizes.vocab, ")");
  }
  return {ids, index};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_embed_fwd_cpu(
    const at::Tensor& input_ids, const at::Tensor& token_index, const at::Tensor& prompts, const at::Tensor& weight,
    const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias, double eps) {
  const PackEmbedSizes sizes = check_pack_embed_inputs(input_ids, token_index, prompts, weight, ln_weight, ln_bias);
  const bool layer_norm = ln_weight.has_value();
  at::Tensor ids;
  at::Tensor index;
  std::tie(ids, index) = checked_indices(input_ids, token_index, sizes);
  const at::Tensor table = weight.contiguous();
  const at::Tensor prompt_rows = prompts.to(weight.scalar_type()).contiguous();
  at::Tensor gamma;
  at::Tensor beta;
  if (layer_norm) std::tie(gamma, beta) = layer_norm_params(*ln_weight, ln_bias, accumulate_dtype(weight.scalar_type()));
  at::Tensor out;
  at::Tensor mean;
  at::Tensor rstd;
  std::tie(out, mean, rstd) = allocate_forward_outputs(weight, sizes, layer_norm);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "pack_embed_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_rows<scalar_t, acc_t>(ids.const_data_ptr<int64_t>(), index.const_data_ptr<int64_t>(),
                                  table.const_data_ptr<scalar_t>(), prompt_rows.const_data_ptr<scalar_t>(),
                                  layer_norm ? gamma.const_data_ptr<acc_t>() : nullptr,
                                  layer_norm ? beta.const_data_ptr<acc_t>() : nullptr, eps, sizes,
                                  out.mutable_data_ptr<scalar_t>(),
                                  layer_norm ? mean.mutable_data_ptr<acc_t>() : nullptr,
                                  layer_norm ? rstd.mutable_data_ptr<acc_t>() : nullptr);
  });
  return {out, mean, rstd};
}

at::Tensor pack_embed_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& prompts,
                              const std::optional<at::Tensor>& ln_weight, const at::Tensor& mean,
                              const at::Tensor& rstd) {
  const int64_t prompt_rows = check_pack_embed_backward_inputs(grad_out, prompts, ln_weight, mean, rstd);
  const at::Tensor prompt_grad_out = grad_out.narrow(0, 0, prompt_rows);
  if (!ln_weight.has_value()) {
    // A copy, never a view: a custom op's output must not alias its input.
    return prompt_grad_out.reshape(prompts.sizes()).to(prompts.scalar_type(), false, /*copy=*/true);
  }
  const at::ScalarType table_dtype = grad_out.scalar_type();
  const at::ScalarType acc_dtype = accumulate_dtype(table_dtype);
  const int64_t hidden = prompts.size(2);
  at::Tensor grad_prompts = at::empty({prompt_rows, hidden}, grad_out.options().dtype(acc_dtype));
  const at::Tensor grad = prompt_grad_out.contiguous();
  const at::Tensor prompt_rows_in_table_dtype = prompts.to(table_dtype).contiguous();
  const at::Tensor gamma = ln_weight->to(acc_dtype).contiguous();
  const at::Tensor row_mean = mean.contiguous();
  const at::Tensor row_rstd = rstd.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, table_dtype, "pack_embed_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    prompt_layer_norm_backward(grad.const_data_ptr<scalar_t>(), prompt_rows_in_table_dtype.const_data_ptr<scalar_t>(),
                               row_mean.const_data_ptr<acc_t>(), row_rstd.const_data_ptr<acc_t>(),
                               gamma.const_data_ptr<acc_t>(), prompt_rows, hidden,
                               grad_prompts.mutable_data_ptr<acc_t>());
  });
  return grad_prompts.view(prompts.sizes()).to(prompts.scalar_type());
}

}  // namespace

TORCH_LIBRARY(fastprompt, m) {
  m.def(
      "pack_embed_fwd(Tensor input_ids, Tensor token_index, Tensor prompts, Tensor weight, Tensor? ln_weight, "
      "Tensor? ln_bias, float eps) -> (Tensor out, Tensor mean, Tensor rstd)");
  m.def(
      "pack_embed_bwd(Tensor grad_out, Tensor prompts, Tensor? ln_weight, Tensor mean, Tensor rstd) "
      "-> Tensor grad_prompts");
}

TORCH_LIBRARY_IMPL(fastprompt, CPU, m) {
  m.impl("pack_embed_fwd", &pack_embed_fwd_cpu);
  m.impl("pack_embed_bwd", &pack_embed_bwd_cpu);
}

}  // namespace fastprompt
