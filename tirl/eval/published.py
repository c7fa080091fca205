"""Published numbers to print beside ours when the model matches (shared/notes/papers.md).

ToRL Table 3 (greedy, accuracy %); ReTool Table 1 (avg@32, %)."""

TORL_BENCHES = ("aime24", "aime25", "math500", "olympiadbench", "amc23")

PUBLISHED: dict[str, dict[str, float]] = {
    # ToRL paper, Table 3
    "Qwen/Qwen2.5-Math-1.5B-Instruct": {"aime24": 10.0, "aime25": 10.0, "math500": 66.0, "olympiadbench": 31.0, "amc23": 62.5},
    "GAIR/ToRL-1.5B": {"aime24": 26.7, "aime25": 26.7, "math500": 77.8, "olympiadbench": 44.0, "amc23": 67.5},
    "Qwen/Qwen2.5-Math-7B-Instruct": {"aime24": 10.0, "aime25": 16.7, "math500": 74.8, "olympiadbench": 32.4, "amc23": 65.0},
    "GAIR/ToRL-7B": {"aime24": 43.3, "aime25": 30.0, "math500": 82.2, "olympiadbench": 49.9, "amc23": 75.0},
    # ReTool paper, Table 1 (avg@32)
    "Qwen/Qwen2.5-32B-Instruct": {"aime24": 26.7},
}


def published_for(model: str) -> dict[str, float] | None:
    return PUBLISHED.get(model)
