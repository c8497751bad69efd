"""Shared test fixtures: the slow/gpu markers and one real local Ray instance per session."""

import os
import pathlib

import pytest

# No test reaches the network: the Hugging Face hub client answers from its cache or fails.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--runslow") or os.environ.get("FISHERSFT_RUNSLOW") == "1"
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        has_gpu = False
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow or `make test-all`")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance for the whole session (2 CPUs, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture()
def ray_cluster():
    """A LocalRayCluster (not started: the test starts its head and workers), stopped after."""
    from local_cluster import LocalRayCluster

    cluster = LocalRayCluster()
    yield cluster
    cluster.stop()


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
TRAINING_LINES = [
    "First Citizen: Before we proceed any further, hear me speak.",
    "All: Speak, speak. You are all resolved rather to die than to famish?",
    "Natalia sold clips to 48 of her friends in April, and then half as many in May.",
    "How many clips did Natalia sell altogether? The answer is 72.",
    "user assistant system hello world what is two plus two four",
]


def build_tokenizer(chat_template: str | None = CHATML):
    """A byte-level BPE trained on a few lines (any text encodes), with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(TRAINING_LINES, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = chat_template
    return tokenizer


def save_tiny_model(directory: pathlib.Path, config, tokenizer) -> str:
    """A random model from ``config`` saved with ``tokenizer`` like any HF checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{"llama": dir (d=32), "gpt2": dir (d=48), "llama_no_template": dir}: tiny random models
    with a locally trained tokenizer, saved and loaded through from_pretrained. No download
    and no offline-model wheel needed."""
    from transformers import GPT2Config, LlamaConfig

    root = tmp_path_factory.mktemp("tiny_models")
    tokenizer = build_tokenizer()
    llama = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=512, tie_word_embeddings=False)
    gpt2 = GPT2Config(vocab_size=len(tokenizer), n_embd=48, n_layer=2, n_head=4, n_positions=512)
    return {
        "llama": save_tiny_model(root / "llama", llama, tokenizer),
        "gpt2": save_tiny_model(root / "gpt2", gpt2, tokenizer),
        "llama_no_template": save_tiny_model(root / "llama_plain", llama, build_tokenizer(None)),
    }


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_models):
    """The tiny Llama (d=32) with a ChatML template: the end-to-end tests' model."""
    return pathlib.Path(tiny_models["llama"])


@pytest.fixture()
def one_torch_thread():
    """One intra-op thread for the test (small batched ops run faster on a loaded 2-core
    box), restored afterwards so no other test inherits it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback (as s3fs's own tests do); yields storage options."""
    import boto3
    from moto.server import ThreadedMotoServer

    from local_cluster import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    yield {"endpoint": endpoint, "storage_options": options, "client": client}
    server.stop()
