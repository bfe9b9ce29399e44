// Shared by the CPU and CUDA backends of fastprompt::embed_concat: argument
// checks and output layout. Everything here is host code built from ATen
// calls, so both translation units agree on shapes and dtypes by
// construction; the Python fake kernels in fastprompt/ops/native.py mirror
// the same rules.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fastprompt {

struct EmbedConcatSizes {
  int64_t batch;
  int64_t prompt_rows;
  int64_t tokens;
  int64_t hidden;
  int64_t vocab;

  int64_t rows_per_item() const { return prompt_rows + tokens; }
};

// LayerNorm statistics and every reduction run in this type: fp32 for the
// 16-bit formats and for fp32, fp64 for fp64 (gradcheck).
inline at::ScalarType accumulate_dtype(at::ScalarType weight_dtype) {
  return weight_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline EmbedConcatSizes check_embed_concat_inputs(
    const at::Tensor& input_ids,
    const at::Tensor& weight,
    const at::Tensor& prompt,
    const std::optional<at::Tensor>& ln_weight,
    const std::optional<at::Tensor>& ln_bias) {
  TORCH_CHECK(input_ids.dim() == 2, "embed_concat: input_ids must be [B, T], got ", input_ids.sizes());
  TORCH_CHECK(input_ids.scalar_type() == at::kLong || input_ids.scalar_type() == at::kInt,
              "embed_concat: input_ids must be int64 or int32, got ", input_ids.scalar_type());
  TORCH_CHECK(weight.dim() == 2, "embed_concat: weight must be [V, H], got ", weight.sizes());
  TORCH_CHECK(prompt.dim() == 2 && prompt.size(1) == weight.size(1),
              "embed_concat: prompt must be [P, ", weight.size(1), "], got ", prompt.sizes());
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()) && at::isFloatingType(prompt.scalar_type()),
              "embed_concat: weight and prompt must be floating point");
  TORCH_CHECK(!ln_bias.has_value() || ln_weight.has_value(),
              "embed_concat: ln_bias without ln_weight (the reference applies no LayerNorm then)");

  const auto device = weight.device();
  TORCH_CHECK(input_ids.device() == device && prompt.device() == device,
              "embed_concat: input_ids, weight and prompt must share a device");
  for (const auto* param : {&ln_weight, &ln_bias}) {
    if (param->has_value()) {
      const at::Tensor& t = param->value();
      TORCH_CHECK(t.dim() == 1 && t.size(0) == weight.size(1),
                  "embed_concat: LayerNorm parameters must be [", weight.size(1), "], got ", t.sizes());
      TORCH_CHECK(t.device() == device, "embed_concat: LayerNorm parameters must be on ", device);
      TORCH_CHECK(at::isFloatingType(t.scalar_type()), "embed_concat: LayerNorm parameters must be floating point");
    }
  }
  return {input_ids.size(0), prompt.size(0), input_ids.size(1), weight.size(1), weight.size(0)};
}

// gamma and beta as contiguous accumulate-dtype vectors; a missing bias
// becomes zeros so kernels need no bias branch (H values, negligible).
inline std::tuple<at::Tensor, at::Tensor> layer_norm_params(
    const at::Tensor& ln_weight, const std::optional<at::Tensor>& ln_bias, at::ScalarType acc_dtype) {
  at::Tensor gamma = ln_weight.to(acc_dtype).contiguous();
  at::Tensor beta = ln_bias.has_value() ? ln_bias->to(acc_dtype).contiguous() : at::zeros_like(gamma);
  return {gamma, beta};
}

// Forward outputs: out [B, P+T, H] in weight's dtype; per-row mean and rstd
// [B, P+T] in the accumulate dtype, or empty [0] when there is no LayerNorm.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_forward_outputs(
    const at::Tensor& weight, const EmbedConcatSizes& sizes, bool layer_norm) {
  at::Tensor out = at::empty({sizes.batch, sizes.rows_per_item(), sizes.hidden}, weight.options());
  const auto stats_options = weight.options().dtype(accumulate_dtype(weight.scalar_type()));
  const std::vector<int64_t> stats_shape =
      layer_norm ? std::vector<int64_t>{sizes.batch, sizes.rows_per_item()} : std::vector<int64_t>{0};
  return {out, at::empty(stats_shape, stats_options), at::empty(stats_shape, stats_options)};
}

inline void check_embed_concat_backward_inputs(const at::Tensor& grad_out, const at::Tensor& mean,
                                               const at::Tensor& rstd, const EmbedConcatSizes& sizes,
                                               bool layer_norm, at::ScalarType acc_dtype) {
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({sizes.batch, sizes.rows_per_item(), sizes.hidden}),
              "embed_concat_bwd: grad_out must be [B, P+T, H], got ", grad_out.sizes());
  if (!layer_norm) return;
  for (const at::Tensor* stats : {&mean, &rstd}) {
    TORCH_CHECK(stats->sizes() == at::IntArrayRef({sizes.batch, sizes.rows_per_item()}) &&
                    stats->scalar_type() == acc_dtype && stats->device() == grad_out.device(),
                "embed_concat_bwd: mean/rstd must be the forward's [B, P+T] ", acc_dtype, " statistics");
  }
}

}  // namespace fastprompt
