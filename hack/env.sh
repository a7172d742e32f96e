# Sourced by hack scripts: puts the cached test tools on PATH.
export TALARIA_TOOLS=${TALARIA_TOOLS:-$HOME/.cache/talaria/tools}
export PATH="$TALARIA_TOOLS/bin:$PATH"
