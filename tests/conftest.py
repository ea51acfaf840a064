"""Session-wide fixtures: tiny random models (built here, never downloaded), the embedded SmolLM2, one process
group and the vLLM engines (fp32, and bf16 for the weight-sync checks) shared by the tests (an engine start costs
seconds on a 2-core machine)."""

import os
import socket
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# One intra-op thread in this process and in every script the tests start (they inherit it): the toy models' ops
# are too small to share between threads, and the tests run scripts side by side on 2 cores, where each one's
# second thread would spin waiting for a core the other holds (a toy refuel.py run took 43 s beside another
# process with 2 threads, 22 s with one)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import engines  # noqa: E402
import utils  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The suite runs on two pytest-xdist workers (pytest.ini), each taking whole groups of tests. A group is a test file,
# except that files sharing a costly session fixture form one group, so that it starts once, in one worker, and not
# once in each: the vLLM server, and the two plug-in task runs.
SHARED_SESSION_FIXTURE = {"test_multiturn": "user_server", "test_presets": "user_server",
                          "test_console": "plugin_task_runs", "test_refuel_tasks": "plugin_task_runs"}
# Groups go out costliest first (by the CPU time of their scripts in a fresh clone's suite on 2 cores), then the
# rest in file order: the suite then ends on short files, not on a long one with the other core idle.
COSTLIEST_FIRST = ("test_benchmarks", "test_dpo_multiturn", "test_ma_ppo", "test_lora", "user_server",
                   "test_rebel_e2e", "test_refuel_e2e", "test_peer_bench", "test_gpu_check", "test_pinned",
                   "test_bad_input", "test_digits", "plugin_task_runs", "test_fsdp")


def group_of(nodeid: str) -> str:
    """The group of the test `nodeid` ("tests/test_x.py::test_y[z]")."""
    stem = os.path.splitext(os.path.basename(nodeid.split("::")[0]))[0]
    return SHARED_SESSION_FIXTURE.get(stem, stem)


def pytest_collection_modifyitems(items):
    order = {name: i for i, name in enumerate(COSTLIEST_FIRST)}
    items.sort(key=lambda item: order.get(group_of(item.nodeid), len(order)))  # stable: the rest keep their order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's whole-file scheduling (`--dist loadscope`, the suite's), on the groups above, in collection
    order; another `--dist` given on the command line keeps its own scheduler."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return ByGroup(config, log)


# A Llama-3-Instruct style chat template, written for these tests (headers, <|eot_id|> ends each turn).
LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def smollm2_path():
    return utils.embedded_smollm2_folder()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, smollm2_path):
    return utils.make_tiny_model(str(tmp_path_factory.mktemp("tiny_policy")), smollm2_path, seed=0)


@pytest.fixture(scope="session")
def tiny_reward_model(tmp_path_factory, smollm2_path):
    return utils.make_tiny_model(str(tmp_path_factory.mktemp("tiny_rm")), smollm2_path, seed=1, reward_model=True)


@pytest.fixture(scope="session")
def llama3_tokenizer(tmp_path_factory, smollm2_path):
    """SmolLM2's vocabulary with Llama-3's special tokens and chat template, saved and reloaded like a real one."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    # Llama-3's tokenizer always reads "\n\n" as one token (id 271); SmolLM2's BPE does not at the end of a
    # text, so it is added as a token here to behave like the real one
    tokenizer.add_tokens(["\n\n"])
    tokenizer.eos_token = "<|eot_id|>"
    tokenizer.chat_template = LLAMA3_TEMPLATE
    folder = str(tmp_path_factory.mktemp("llama3_tokenizer"))
    tokenizer.save_pretrained(folder)
    return utils.load_tokenizer(folder)


@pytest.fixture(scope="session")
def process_group():
    """This pytest process as rank 0 of a one-process group (FSDP2 and vLLM's external launcher need one)."""
    return utils.init_distributed()


@pytest.fixture(scope="session")
def script_env():
    """The environment for the scripts the tests launch. It leaves out the rank variables that `process_group`
    set in this process (vLLM's external launcher reads them): a plain `python rebel.py` that inherited them would
    try to join this process's group on its port instead of making its own."""
    launcher = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    return {key: value for key, value in os.environ.items() if key not in launcher}


@pytest.fixture(scope="session")
def kill_run():
    """`kill(process, checkpoint=None)`: SIGKILLs a launched run and every process under it, as a crashed node
    would, once the `checkpoint` folder exists if one is named (failing if the run ends or 900 s pass first).
    torchrun starts each worker in a session of its own, so killing torchrun's process group alone leaves the
    workers running on."""
    import psutil

    def kill(process, checkpoint=None):
        deadline = time.time() + 900
        while checkpoint is not None and not os.path.isdir(checkpoint):
            assert process.poll() is None and time.time() < deadline, f"the run ended before {checkpoint}"
            time.sleep(0.5)
        root = psutil.Process(process.pid)
        tree = root.children(recursive=True) + [root]
        for p in tree:
            p.kill()
        psutil.wait_procs(tree, timeout=60)
        process.wait()

    return kill


@pytest.fixture(scope="session")
def vllm_engine(process_group, tiny_model):
    engine = engines.make_engine(tiny_model, process_group[2], max_model_len=512, seed=0, bf16=False,
                                 gpu_memory_utilization=0.05, kv_cache_memory_bytes=64 * 2**20, backend="vllm")
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def vllm_bf16_engine(process_group, tiny_model):
    """The tiny model in a bf16 vLLM engine (this CPU's vLLM runs bf16), next to `vllm_engine` for the session: it
    is closed only at the end, because closing an in-process engine tears down vLLM's parallel groups, which the
    other engine shares."""
    engine = engines.make_engine(tiny_model, process_group[2], max_model_len=512, seed=0, bf16=True,
                                 gpu_memory_utilization=0.05, kv_cache_memory_bytes=64 * 2**20, backend="vllm")
    yield engine
    engine.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def user_server(tiny_model, script_env):
    """A real vLLM OpenAI-compatible server of the tiny model on 127.0.0.1 (the simulated user of `--user server`),
    started once for the tests that need it; its model name is the tiny model's folder."""
    port = free_port()
    log = open(os.path.join(os.path.dirname(tiny_model), "server.log"), "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_model, "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
         "--kv-cache-memory-bytes", str(64 * 2**20)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=script_env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    import urllib.request

    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, open(log.name).read()[-3000:]
            time.sleep(1)
    yield url
    os.killpg(server.pid, 9)
    server.wait()


def toy_refuel_command(output_dir, tiny_model, *extra) -> list[str]:
    """refuel.py for one iteration at toy size (4 pairs, 4-token turns, the tiny model, vLLM rollouts) with `extra`
    flags, into `output_dir`/r."""
    return [sys.executable, os.path.join(REPO, "refuel.py"), "--output_dir", str(output_dir), "--run_name", "r",
            "--num_iterations", "1", "--pairs_per_rank", "4", "--minibatch_pairs", "2", "--micro_batch_pairs", "2",
            "--max_new_tokens", "4", "--eval_every", "1", "--kv_cache_gib", "0.0625", "--model", tiny_model,
            "--rollout_backend", "vllm", *extra]


@pytest.fixture(scope="session")
def plugin_task_runs(tmp_path_factory, tiny_model, script_env):
    """Two toy refuel.py runs on plug-in tasks, side by side, each started once and checked by two test files (a
    script start costs 15-25 s of imports on 2 cores): test_console reads their consoles, test_refuel_tasks their
    metrics. "custom": tests/custom_task.py (a fork's task, no script edited), uniform h, default console;
    "difficulty": tests/difficulty_task.py with its own parameter set (`--task_arg difficulty=5`), with --verbose.
    {name: (metrics records, console (stdout and stderr), run folder)}."""
    import json

    folders = {name: tmp_path_factory.mktemp(f"{name}_task_run") for name in ("custom", "difficulty")}
    tasks = os.path.join(REPO, "tests")
    commands = {
        "custom": toy_refuel_command(folders["custom"], tiny_model, "--task",
                                     os.path.join(tasks, "custom_task.py") + ":make_task", "--horizon_sampling",
                                     "uniform"),
        "difficulty": toy_refuel_command(folders["difficulty"], tiny_model, "--task",
                                         os.path.join(tasks, "difficulty_task.py") + ":make_task", "--task_arg",
                                         "difficulty=5", "--verbose")}
    runs = {}
    for name, (returncode, stdout, stderr) in run_side_by_side(commands, script_env,
                                                               tmp_path_factory.mktemp("task_logs")).items():
        assert returncode == 0, stderr[-3000:]
        with open(os.path.join(folders[name], "r", "metrics.jsonl")) as f:
            runs[name] = ([json.loads(line) for line in f], stdout + stderr, os.path.join(folders[name], "r"))
    return runs


@pytest.fixture(scope="session")
def custom_task_run(plugin_task_runs):
    """The "custom" run of `plugin_task_runs`: its metrics and console."""
    return plugin_task_runs["custom"][:2]


@pytest.fixture(scope="session")
def difficulty_task_verbose_run(plugin_task_runs):
    """The "difficulty" run of `plugin_task_runs`: its metrics, console and run folder."""
    return plugin_task_runs["difficulty"]


def run_side_by_side(commands: dict, env: dict, log_dir, jobs: int = 2, timeout: float = 900) -> dict:
    """Runs the independent `commands` ({name: argv}), at most `jobs` at a time: most of a script start is Python
    imports on one core, so on 2 cores two starts side by side take little more than one. Each one's stdout and
    stderr go to files in log_dir (not pipes: a full pipe would stall a process).
    Returns {name: (exit status, stdout, stderr)}, in the order given."""
    names, running, done = list(commands), {}, {}
    logs = {name: (os.path.join(str(log_dir), f"{i}.out"), os.path.join(str(log_dir), f"{i}.err"))
            for i, name in enumerate(names)}
    deadline = time.time() + timeout
    while len(done) < len(names):
        for name in names:
            if len(running) < jobs and name not in running and name not in done:
                with open(logs[name][0], "w") as out, open(logs[name][1], "w") as err:
                    running[name] = subprocess.Popen(commands[name], stdout=out, stderr=err, env=env)
        for name, process in list(running.items()):
            if process.poll() is not None:
                del running[name]
                with open(logs[name][0]) as out, open(logs[name][1]) as err:
                    done[name] = (process.returncode, out.read(), err.read())
        if time.time() > deadline:
            for process in running.values():
                process.kill()
            raise AssertionError(f"still running after {timeout} s: {sorted(running)}")
        time.sleep(0.2)
    return {name: done[name] for name in names}
