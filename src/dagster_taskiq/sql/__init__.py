"""The store's SQL: named statements (queries.sql) and Alembic migrations."""

from pathlib import Path

SQL_DIR = Path(__file__).parent
MIGRATIONS_DIR = SQL_DIR / 'migrations'
# Dagster's own storage keeps its Alembic version in `alembic_version`, often in the same database.
VERSION_TABLE = 'dagster_taskiq_alembic_version'


def load_queries(path: Path = SQL_DIR / 'queries.sql') -> dict[str, str]:
    """Statements of a .sql file, by the name on their `-- name: x` line."""
    queries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in path.read_text().splitlines():
        if line.startswith('-- name: '):
            current = queries.setdefault(line.removeprefix('-- name: ').strip(), [])
        elif current is not None and not line.startswith('--'):
            current.append(line)
    return {name: '\n'.join(lines).strip() for name, lines in queries.items()}
