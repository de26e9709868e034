# What the load scripts share, sourced by run.sh and cpu-split.sh (and bundled with run.sh).
#
# nginx_conf: the nginx side of every proxy comparison, so that they measure the same nginx: WORKERS worker processes (1: master_process off, the worker itself is
# measured), no access log, HTTP/1.1 upstream with a keep-alive pool (as tracecar pools its
# connections), keep-alive limits raised so neither side reconnects.
#
#   nginx_conf DIR WORKERS APP_ADDR LISTEN_ADDR   # writes DIR/nginx.conf, makes DIR/{logs,tmp}
nginx_conf() {
    local dir=$1 workers=$2 app=$3 listen=$4 master=on
    [ "$workers" = 1 ] && master=off
    mkdir -p "$dir/logs" "$dir/tmp"
    cat >"$dir/nginx.conf" <<EOF
daemon off;
master_process $master;
worker_processes $workers;
user root;
pid $dir/nginx.pid;
error_log $dir/logs/error.log error;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    upstream app {
        server $app;
        keepalive 128;
        keepalive_requests 1000000;
    }
    server {
        listen $listen;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
}

# proc_ticks PID: "utime stime" of PID and its children processes (nginx workers), clock ticks.
proc_ticks() {
    local p u=0 s=0 f
    for p in "$1" $(cat "/proc/$1/task/$1/children" 2>/dev/null); do
        f=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null) || continue
        # after "comm) ": field 1 is state, so utime/stime (stat fields 14/15) are 12/13 here
        u=$((u + $(echo "$f" | awk '{ print $12 }')))
        s=$((s + $(echo "$f" | awk '{ print $13 }')))
    done
    echo "$u $s"
}

# hwm_kib PID: peak RSS (VmHWM) of PID plus its children processes, KiB.
hwm_kib() {
    local p t=0 v
    for p in "$1" $(cat "/proc/$1/task/$1/children" 2>/dev/null); do
        v=$(awk '/^VmHWM:/ { print $2 }' "/proc/$p/status" 2>/dev/null || echo 0)
        t=$((t + ${v:-0}))
    done
    echo "$t"
}
