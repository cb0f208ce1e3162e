// Command reload-go-server is the smallest net/http server that reloads
// under reload-agent without losing a request (docs/recipes/go.md).
//
// Three things, each a few lines:
//   - it serves on the sockets the agent passes (LISTEN_FDS, fd 3 and up)
//     instead of binding its own, so old and new process share one queue;
//   - it says READY=1 on NOTIFY_SOCKET once it serves, so the agent knows
//     exactly when this process (not the old one) is ready;
//   - on SIGTERM it drains without closing a keep-alive connection under a
//     client: see drain.
//
// Standard library only; builds offline with `go build`.
package main

import (
	"context"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"
)

// drainGrace is how long a draining process keeps answering (each answer
// with Connection: close) before it closes the connections still idle.
// A keep-alive client sends its next request well within it, gets its
// answer and reconnects, to the new process.
const drainGrace = time.Second

var draining atomic.Bool

func main() {
	if len(os.Args) > 1 && os.Args[1] == "--version" {
		// The agent's preflight runs every release once this way first.
		fmt.Println("reload-go-server")
		return
	}
	listeners, err := inherited()
	if err != nil {
		log.Fatal(err)
	}
	version := os.Getenv("RELOAD_SERVICE_VERSION")
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if draining.Load() {
				// net/http closes the connection after this response: the
				// client learns it before sending anything more here.
				w.Header().Set("Connection", "close")
			}
			w.Header().Set("X-Version", version)
			fmt.Fprintln(w, "ok")
		}),
		ReadHeaderTimeout: 10 * time.Second,
	}
	for _, l := range listeners {
		go srv.Serve(l)
	}
	notify("READY=1")

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM)
	<-stop
	drain(srv, listeners)
}

// drain ends this process without failing a request. http.Server.Shutdown
// alone (and SetKeepAlivesEnabled(false)) closes idle keep-alive
// connections at once, and a client whose next request is already on its
// way gets a closed connection: about one failed request per connection
// per reload. So: stop accepting (the new process takes every new
// connection from the shared socket), answer every further request with
// Connection: close for drainGrace, then Shutdown, which closes what
// stayed idle and waits for requests in progress.
func drain(srv *http.Server, listeners []net.Listener) {
	draining.Store(true)
	notify("STOPPING=1")
	for _, l := range listeners {
		l.Close()
	}
	time.Sleep(drainGrace)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		log.Printf("shutdown: %v", err)
	}
}

// inherited returns the sockets of the socket-activation protocol
// (LISTEN_FDS, for this pid).
func inherited() ([]net.Listener, error) {
	if os.Getenv("LISTEN_PID") != strconv.Itoa(os.Getpid()) {
		return nil, fmt.Errorf("no sockets passed: run under reload-agent (LISTEN_PID is not this process)")
	}
	n, err := strconv.Atoi(os.Getenv("LISTEN_FDS"))
	if err != nil || n < 1 {
		return nil, fmt.Errorf("no sockets passed (LISTEN_FDS=%q)", os.Getenv("LISTEN_FDS"))
	}
	var listeners []net.Listener
	for fd := 3; fd < 3+n; fd++ {
		file := os.NewFile(uintptr(fd), "listener")
		l, err := net.FileListener(file) // a duplicate: the original is closed below
		if err != nil {
			return nil, fmt.Errorf("fd %d: %w", fd, err)
		}
		file.Close()
		listeners = append(listeners, l)
	}
	return listeners, nil
}

// notify sends state to NOTIFY_SOCKET, if set (Go's "@" prefix names an
// abstract socket, as systemd's does).
func notify(state string) {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return
	}
	conn, err := net.Dial("unixgram", path)
	if err != nil {
		log.Printf("notify: %v", err)
		return
	}
	defer conn.Close()
	if _, err := conn.Write([]byte(state)); err != nil {
		log.Printf("notify: %v", err)
	}
}
