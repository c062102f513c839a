#!/usr/bin/env bash
# s3-server.sh - run a real, SigV4-checking S3 server on loopback for tests.
#
# Starts a throw-away one-machine Ceph cluster (one monitor, one memstore OSD,
# pool size 1, no cephx) plus Ceph's RADOS Gateway (radosgw) on 127.0.0.1,
# and creates an S3 user with a known key pair. Everything (config, data,
# logs, pid files, keyrings, sockets) lives in one state directory, nothing
# in /etc/ceph, /var/lib/ceph or /var/run/ceph is used.
#
# Usage: scripts/s3-server.sh start|stop|status|env
#   start   start the cluster and radosgw (no-op if already running)
#   stop    kill the processes started by `start` and remove the state dir
#   status  say whether it runs (exit 0 if running, 1 if not)
#   env     print `export` lines for the tests: eval "$(scripts/s3-server.sh env)"
#           (also BOTTOMLESS_TEST_STS_ENDPOINT and BOTTOMLESS_TEST_ROLE_ARN: a
#           second gateway of the same cluster with RGW's STS enabled, and a role
#           the user may assume there; it issues real temporary credentials)
#
# Environment:
#   BOTTOMLESS_S3_DIR         state directory (default /tmp/bottomless-s3)
#   BOTTOMLESS_S3_PORT        radosgw port (default: a free port)
#   BOTTOMLESS_S3_ACCESS_KEY  access key of the S3 user (default bottomless-test-access)
#   BOTTOMLESS_S3_SECRET_KEY  secret key of the S3 user (default bottomless-test-secret-0123456789)
#
# Needs the Debian packages radosgw ceph-mon ceph-osd ceph-common (Ceph 16.2),
# run as root (or as a user that can run the Ceph daemons).
set -euo pipefail

DIR=${BOTTOMLESS_S3_DIR:-/tmp/bottomless-s3}
DIR=${DIR%/}
MARKER="$DIR/.bottomless-s3-state"
CONF="$DIR/ceph.conf"
DAEMONS=(mon osd rgw rgwsts)    # pid files: $DIR/run/<name>.pid
START_TIMEOUT=${BOTTOMLESS_S3_START_TIMEOUT:-90}
CMD_TIMEOUT=60                  # for each ceph / radosgw-admin command
RGW_UID=bottomless-test
ROLE_NAME=bottomless-test-role
# RGW encrypts its session tokens with this AES-128 key (exactly 16 characters).
STS_KEY=bottomless-sts-k

log() { printf 's3-server: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    echo "usage: $0 start|stop|status|env" >&2
    exit 2
}

# Expected executable name (as in /proc/PID/comm) of each daemon.
comm_of() {
    case $1 in
        mon) echo ceph-mon ;;
        osd) echo ceph-osd ;;
        rgw | rgwsts) echo radosgw ;;
        *) die "unknown daemon $1" ;;
    esac
}

# True if process $1 exists and is not a zombie. (Daemons are reparented to
# pid 1, which in some containers reaps its zombies only every few seconds.)
pid_alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != [ZX] ]]
}

# Print the pid of daemon $1 if its pid file names a live process of the
# right executable (guards against pid reuse); fail otherwise.
live_pid() {
    local pidfile="$DIR/run/$1.pid" pid comm
    [[ -r $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$(comm_of "$1")" ]] || return 1
    pid_alive "$pid" || return 1
    echo "$pid"
}

# True if every daemon runs.
all_running() {
    local d
    for d in "${DAEMONS[@]}"; do
        live_pid "$d" >/dev/null || return 1
    done
}

# True if at least one daemon runs.
any_running() {
    local d
    for d in "${DAEMONS[@]}"; do
        live_pid "$d" >/dev/null && return 0
    done
    return 1
}

# Stop one daemon we started (by its pid file): TERM, wait up to ~10 s, KILL.
kill_daemon() {
    local pid i
    pid=$(live_pid "$1") || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        pid_alive "$pid" || return 0
        sleep 0.1
    done
    log "$(comm_of "$1") (pid $pid) did not exit 10 s after TERM, sending KILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        pid_alive "$pid" || return 0
        sleep 0.1
    done
    die "$(comm_of "$1") (pid $pid) survived KILL"
}

# Stop the daemons in reverse start order: the OSD shuts down quickly only
# while its monitor is still there to be told.
kill_daemons() {
    kill_daemon rgwsts
    kill_daemon rgw
    kill_daemon osd
    kill_daemon mon
}

# Remove the state directory, but only if it is ours (has the marker) or empty.
remove_state_dir() {
    [[ -e $DIR ]] || return 0
    if [[ -f $MARKER ]]; then
        rm -rf -- "$DIR"
    elif rmdir -- "$DIR" 2>/dev/null; then
        :
    else
        die "$DIR exists but was not made by this script; not removing it"
    fi
}

# Print a free TCP port on 127.0.0.1.
free_port() {
    python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

ceph_cli() {
    timeout -k 5 "$CMD_TIMEOUT" ceph -c "$CONF" --connect-timeout 30 "$@"
}

rgw_admin() {
    timeout -k 5 "$CMD_TIMEOUT" radosgw-admin -c "$CONF" -n client.admin "$@"
}

# Show the tail of the logs that matter, then fail.
fail_start() {
    local f
    log "error: $*"
    for f in "$DIR"/log/*.log "$DIR"/log/*.out; do
        [[ -s $f ]] || continue
        printf '==== tail of %s ====\n' "$f" >&2
        tail -n 20 "$f" >&2
    done
    kill_daemons || true
    log "state kept in $DIR for inspection; '$0 stop' removes it"
    exit 1
}

# Run a daemon that daemonizes itself (its pid file comes from ceph.conf).
# Its stdio goes to a log file so that `$(... start)` never hangs on a pipe.
start_daemon() {
    local name=$1
    shift
    # 9>&-: the daemon must not inherit (and keep holding) our lock.
    if ! "$@" </dev/null >>"$DIR/log/$name.out" 2>&1 9>&-; then
        fail_start "could not start $name: $*"
    fi
    local i
    for ((i = 0; i < 100; i++)); do
        live_pid "$name" >/dev/null && return 0
        sleep 0.1
    done
    fail_start "$name did not write its pid file $DIR/run/$name.pid"
}

write_conf() {
    local fsid=$1 mon_port=$2 rgw_port=$3 sts_port=$4
    cat >"$CONF" <<EOF
# Generated by scripts/s3-server.sh; removed by '$0 stop'.
[global]
fsid = $fsid
mon host = v1:127.0.0.1:$mon_port
public network = 127.0.0.0/8
ms bind msgr2 = false
ms bind ipv6 = false

# No cephx; then msgr must use crc mode or radosgw hangs on authentication.
auth cluster required = none
auth service required = none
auth client required = none
auth supported = none
ms client mode = crc
ms service mode = crc
ms cluster mode = crc
ms mon client mode = crc
ms mon service mode = crc
ms mon cluster mode = crc

# Everything lives in the state directory.
run dir = $DIR/run
crash dir = $DIR/crash
keyring = $DIR/keyring
log file = $DIR/log/\$name.log
mon cluster log file = $DIR/log/cluster.log
admin socket = $DIR/run/\$name.\$pid.asok

# One OSD, pools of size 1, few PGs, and no warnings that matter.
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
mon data avail warn = 1
mon data avail crit = 0
mon warn on insecure global id reclaim = false
mon warn on insecure global id reclaim allowed = false
# Commit monitor changes quickly (radosgw creates its pools one by one).
paxos propose interval = 0.1

# Small logs.
debug ms = 0/0
debug mon = 0/0
debug paxos = 0/0
debug osd = 0/0
debug rgw = 1/1
debug monc = 0/0
debug auth = 0/0

# A client command must fail, not hang, when the cluster is unreachable.
client mount timeout = 30

[mon]
mon data = $DIR/mon/\$cluster-\$id
pid file = $DIR/run/mon.pid
admin socket = $DIR/run/\$name.asok

[osd]
osd objectstore = memstore
# memstore takes RAM only as objects arrive; 8 GiB is a ceiling, not a reservation.
memstore device bytes = 8589934592
osd data = $DIR/osd/\$cluster-\$id
pid file = $DIR/run/osd.pid
admin socket = $DIR/run/\$name.asok
osd op num shards = 2
osd op num threads per shard = 2
# With auth off the OSD can send its start-up crush commands before it has
# the monitor's monmap, and the monitor then rejects them ("wrong fsid"), so
# the OSD dies. The script puts osd.0 into the crush map instead.
osd crush update on start = false
osd class update on start = false

[client.rgw]
pid file = $DIR/run/rgw.pid
admin socket = $DIR/run/\$name.asok
rgw data = $DIR/rgw
rgw frontends = beast endpoint=127.0.0.1:$rgw_port tcp_nodelay=1
rgw dns name =
rgw enable usage log = false
rgw thread pool size = 64
rgw enable ops log = false
# Deleted objects go to RGW's garbage collector, which by default frees them
# only after 2 hours: long test runs would fill the memstore OSD ("full osd",
# then every request stalls). Collect at once, every few seconds.
rgw gc obj min wait = 0
rgw gc processor period = 5
rgw gc processor max time = 5

# A second gateway of the same cluster (same users, buckets, roles) with STS:
# AssumeRole at this endpoint, and S3 requests signed with its temporary
# credentials (X-Amz-Security-Token), for the credential provider tests. Not
# on the main gateway: with STS enabled RGW answers a wrong secret or an
# unknown key id AccessDenied instead of SignatureDoesNotMatch /
# InvalidAccessKeyId (its STS engine's refusal wins), unlike S3.
[client.rgwsts]
pid file = $DIR/run/rgwsts.pid
admin socket = $DIR/run/\$name.asok
rgw data = $DIR/rgwsts
rgw frontends = beast endpoint=127.0.0.1:$sts_port tcp_nodelay=1
rgw dns name =
rgw enable usage log = false
rgw thread pool size = 16
rgw enable ops log = false
rgw s3 auth use sts = true
rgw sts key = $STS_KEY
EOF
}

cmd_start() {
    if all_running; then
        log "already running at http://127.0.0.1:$(cat "$DIR/port") (state in $DIR)"
        return 0
    fi
    if [[ -e $DIR ]]; then
        [[ -f $MARKER ]] || rmdir -- "$DIR" 2>/dev/null || [[ ! -e $DIR ]] ||
            die "$DIR exists but was not made by this script; not using it"
    fi
    if [[ -e $DIR ]]; then
        if any_running; then
            log "found a partly running server in $DIR; stopping it"
            kill_daemons
        else
            log "removing stale state in $DIR"
        fi
        remove_state_dir
    fi

    local t0 access secret fsid mon_port rgw_port sts_port
    t0=$(date +%s%N)
    access=${BOTTOMLESS_S3_ACCESS_KEY:-bottomless-test-access}
    secret=${BOTTOMLESS_S3_SECRET_KEY:-bottomless-test-secret-0123456789}

    if [[ -n ${BOTTOMLESS_S3_PORT:-} ]]; then
        rgw_port=$BOTTOMLESS_S3_PORT
        [[ $rgw_port =~ ^[0-9]+$ ]] || die "BOTTOMLESS_S3_PORT=$rgw_port is not a port number"
        ! port_in_use "$rgw_port" || die "port $rgw_port (BOTTOMLESS_S3_PORT) is already in use"
    else
        rgw_port=$(free_port)
    fi
    mon_port=$(free_port)
    while [[ $mon_port == "$rgw_port" ]]; do mon_port=$(free_port); done
    sts_port=$(free_port)
    while [[ $sts_port == "$rgw_port" || $sts_port == "$mon_port" ]]; do sts_port=$(free_port); done
    fsid=$(cat /proc/sys/kernel/random/uuid)

    mkdir -p "$DIR"
    : >"$MARKER"
    mkdir -p "$DIR"/{run,log,crash,mon,osd/ceph-0,rgw,rgwsts}
    echo "$rgw_port" >"$DIR/port"
    {
        printf 'export LIBSQL_BOTTOMLESS_ENDPOINT=%q\n' "http://127.0.0.1:$rgw_port"
        printf 'export AWS_ACCESS_KEY_ID=%q\n' "$access"
        printf 'export AWS_SECRET_ACCESS_KEY=%q\n' "$secret"
        printf 'export AWS_REGION=%q\n' us-east-1
        printf 'export BOTTOMLESS_TEST_STS_ENDPOINT=%q\n' "http://127.0.0.1:$sts_port"
    } >"$DIR/env"
    write_conf "$fsid" "$mon_port" "$rgw_port" "$sts_port"

    # Monitor. Auth is off, but mkfs still wants a keyring to exist.
    ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n mon. \
        --cap mon 'allow *' >/dev/null
    ceph-authtool "$DIR/keyring" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
    monmaptool --create --fsid "$fsid" --addv a "[v1:127.0.0.1:$mon_port]" \
        "$DIR/monmap" >/dev/null
    timeout -k 5 "$CMD_TIMEOUT" ceph-mon -c "$CONF" -i a --mkfs \
        --monmap "$DIR/monmap" --keyring "$DIR/keyring" \
        </dev/null >>"$DIR/log/mon.out" 2>&1 || fail_start "ceph-mon --mkfs failed"
    start_daemon mon ceph-mon -c "$CONF" -i a

    # OSD.
    local osd_uuid osd_id
    osd_uuid=$(cat /proc/sys/kernel/random/uuid)
    # A monitor that has just started may refuse the first commands ("EPERM:
    # problem getting command descriptions from mon", seen on a loaded
    # machine): retry. Creating an OSD by its uuid is idempotent.
    local attempt
    for attempt in 1 2 3 4 5 6; do
        osd_id=$(ceph_cli osd create "$osd_uuid" 2>>"$DIR/log/cli.out") && break
        [[ $attempt == 6 ]] && fail_start "'ceph osd create' failed"
        sleep 2
    done
    [[ $osd_id == 0 ]] || fail_start "expected osd id 0, got '$osd_id'"
    ceph_cli osd crush add osd.0 1.0 root=default >>"$DIR/log/cli.out" 2>&1 ||
        fail_start "'ceph osd crush add' failed"
    timeout -k 5 "$CMD_TIMEOUT" ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$osd_uuid" \
        </dev/null >>"$DIR/log/osd.out" 2>&1 || fail_start "ceph-osd --mkfs failed"
    start_daemon osd ceph-osd -c "$CONF" -i 0

    local deadline=$((SECONDS + START_TIMEOUT))
    until ceph_cli osd dump 2>>"$DIR/log/cli.out" | grep -Eq '^osd\.0 up +in '; do
        ((SECONDS < deadline)) || fail_start "osd.0 not up and in after ${START_TIMEOUT}s"
        live_pid osd >/dev/null || fail_start "ceph-osd exited"
        sleep 0.5
    done

    # RADOS Gateway; it creates its pools on start.
    start_daemon rgw radosgw -c "$CONF" -n client.rgw
    until http_ok "$rgw_port"; do
        ((SECONDS < deadline)) || fail_start "radosgw not answering HTTP on port $rgw_port after ${START_TIMEOUT}s"
        live_pid rgw >/dev/null || fail_start "radosgw exited"
        sleep 0.5
    done

    start_daemon rgwsts radosgw -c "$CONF" -n client.rgwsts
    until http_ok "$sts_port"; do
        ((SECONDS < deadline)) || fail_start "the STS radosgw not answering HTTP on port $sts_port after ${START_TIMEOUT}s"
        live_pid rgwsts >/dev/null || fail_start "the STS radosgw exited"
        sleep 0.5
    done

    rgw_admin user create --uid="$RGW_UID" --display-name="bottomless tests" \
        --access-key="$access" --secret-key="$secret" \
        >>"$DIR/log/cli.out" 2>&1 || fail_start "radosgw-admin user create failed"

    # A role the test user may assume (STS AssumeRole), allowed all of S3.
    local trust policy role_json role_arn
    trust='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"AWS":["arn:aws:iam:::user/'"$RGW_UID"'"]},"Action":["sts:AssumeRole"]}]}'
    policy='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["s3:*"],"Resource":["arn:aws:s3:::*"]}]}'
    rgw_admin caps add --uid="$RGW_UID" --caps="roles=*" >>"$DIR/log/cli.out" 2>&1 ||
        fail_start "radosgw-admin caps add failed"
    role_json=$(rgw_admin role create --role-name="$ROLE_NAME" --path=/ \
        --assume-role-policy-doc="$trust" 2>>"$DIR/log/cli.out") || fail_start "radosgw-admin role create failed"
    role_arn=$(printf '%s' "$role_json" | python3 -c 'import json, sys; d = json.load(sys.stdin); print(d.get("Arn") or d["arn"])') ||
        fail_start "radosgw-admin role create printed no arn: $role_json"
    rgw_admin role-policy put --role-name="$ROLE_NAME" --policy-name=s3-all --policy-doc="$policy" \
        >>"$DIR/log/cli.out" 2>&1 || fail_start "radosgw-admin role-policy put failed"
    printf 'export BOTTOMLESS_TEST_ROLE_ARN=%q\n' "$role_arn" >>"$DIR/env"

    local t1
    t1=$(date +%s%N)
    log "started in $(((t1 - t0) / 1000000)) ms"
    log "running at http://127.0.0.1:$rgw_port (state in $DIR)"
}

# True if an HTTP server answers on 127.0.0.1:$1 (any status).
http_ok() {
    # shellcheck disable=SC2016 # expanded by the inner bash
    timeout 5 bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf "GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" >&3
        IFS= read -r line <&3 || exit 1
        cat <&3 >/dev/null
        [[ $line == HTTP/* ]]' _ "$1" 2>/dev/null
}

cmd_stop() {
    if any_running; then
        kill_daemons
        remove_state_dir
        log "stopped"
    else
        remove_state_dir
        log "not running"
    fi
}

cmd_status() {
    if all_running; then
        log "running at http://127.0.0.1:$(cat "$DIR/port") (state in $DIR)"
    elif any_running; then
        log "partly running in $DIR (some daemons died); run '$0 stop'"
        return 1
    else
        log "not running"
        return 1
    fi
}

cmd_env() {
    all_running || die "not running (start it with '$0 start')"
    cat "$DIR/env"
}

# Serialise concurrent start/stop calls (of any state directory). The lock is
# on this script file, so it leaves nothing behind.
lock() {
    exec 9<"${BASH_SOURCE[0]}"
    flock -w 300 9 || die "timed out waiting for another '$0' start/stop"
}

[[ $# -eq 1 ]] || usage
case $1 in
    start) lock; cmd_start ;;
    stop) lock; cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) usage ;;
esac
