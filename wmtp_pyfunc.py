"""MLflow pyfunc models of what the trainers write, logged from this file (models-from-code: no
pickled objects) with the kit's modules as their code (wmtp_runs.log_pyfunc).
`mlflow.pyfunc.load_model("models:/<name>/<version>")` loads either; model_config["pyfunc"] says which.

- value_head (train_critic.py): artifacts {"value_head": the .safetensors file}, a copy inside the
  MLflow model (a few MB). predict: rows of head 0's final normed hidden states [N, D] -> values [N].
- mtp (train_mtp.py): model_config["final_model"] = <run>/final, the folder train_mtp.py wrote
  (local or s3://); the MLflow model points at it and holds no copy of the weights. predict:
  prompts -> greedy completions from head 0, at most model_config["max_new_tokens"] tokens each.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class ValueHeadModel(PythonModel):
    """The stage-1 value head: hidden states -> values."""

    def load_context(self, context) -> None:
        import io_stream
        from wmtp_loss import ValueHead

        state = io_stream.read_safetensors(context.artifacts["value_head"])
        self.head = ValueHead(state["fc1.weight"].shape[1])
        self.head.load_state_dict(state)
        self.head.eval()

    def predict(self, model_input: list[list[float]], params: dict | None = None) -> list[float]:
        import torch

        with torch.no_grad():
            return self.head(torch.tensor(model_input, dtype=torch.float32)).tolist()


class MTPGenerator(PythonModel):
    """The final MTP model (trunk + heads) read from its folder: prompts -> completions."""

    def load_context(self, context) -> None:
        import torch

        from wmtp_model import load_model, load_tokenizer

        path = context.model_config["final_model"]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(path, kind="mtp", device=device).eval()
        self.tokenizer = load_tokenizer(path)
        self.max_new_tokens = int(context.model_config.get("max_new_tokens", 256))

    def predict(self, model_input: list[str], params: dict | None = None) -> list[str]:
        from wmtp_eval import generate

        out = generate(self.model, self.tokenizer, model_input, max_new_tokens=self.max_new_tokens)
        return [samples[0] for samples in out]


MODELS = {"value_head": ValueHeadModel, "mtp": MTPGenerator}
mlflow.models.set_model(MODELS[mlflow.models.ModelConfig().get("pyfunc")]())
