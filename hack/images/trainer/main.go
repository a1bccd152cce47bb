// Command trainer is a stand-in distributed training worker for TrainingJob
// tests on the real node. It checks what a real job needs from the cluster:
// the rendezvous env, DNS of the rank-0 pod through the headless Service,
// TCP between pods, and the same data in every rank's data mount.
//
// Environment (DESIGN §1.3): RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; or
// TF_CONFIG ({"cluster":{"worker":["h0:2222",...]},"task":{"type":"worker","index":i}})
// where worker[0] is the master. Also:
//
//	DATA_FILE     file read in full; its sha256 is logged and compared across ranks
//	EXIT_CODE     exit status after a successful exchange (default 0)
//	TIMEOUT       how long rank 0 waits for peers and peers retry (Go duration, default 120s)
//	HOLD          stay alive this long before exiting (default 0), for tests of running jobs
//
// Rank 0 listens on MASTER_PORT and accepts WORLD_SIZE-1 peers. Each peer
// sends "rank=<r> sha256=<hex>"; rank 0 answers "sha256=<hex>". A rank whose
// checksum differs from rank 0's exits 3; a rendezvous that does not finish
// in time exits 2; an unreadable DATA_FILE exits 4.
package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"strconv"
	"strings"
	"time"
)

func fail(code int, format string, a ...any) {
	log.Printf("FAIL: "+format, a...)
	os.Exit(code)
}

func envInt(name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		fail(1, "%s=%q is not an integer", name, v)
	}
	return n
}

func envDur(name string, def time.Duration) time.Duration {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		if s, err2 := strconv.Atoi(v); err2 == nil {
			return time.Duration(s) * time.Second
		}
		fail(1, "%s=%q: %v", name, v, err)
	}
	return d
}

// rendezvous returns rank, world size, master host and port.
func rendezvous() (int, int, string, string) {
	if tf := os.Getenv("TF_CONFIG"); tf != "" && os.Getenv("MASTER_ADDR") == "" {
		var c struct {
			Cluster map[string][]string `json:"cluster"`
			Task    struct {
				Type  string `json:"type"`
				Index int    `json:"index"`
			} `json:"task"`
		}
		if err := json.Unmarshal([]byte(tf), &c); err != nil {
			fail(1, "TF_CONFIG: %v", err)
		}
		workers := c.Cluster["worker"]
		if len(workers) == 0 {
			fail(1, "TF_CONFIG has no cluster.worker list")
		}
		host, port, err := net.SplitHostPort(workers[0])
		if err != nil {
			fail(1, "TF_CONFIG worker[0]=%q: %v", workers[0], err)
		}
		return c.Task.Index, len(workers), host, port
	}
	rank := envInt("RANK", 0)
	world := envInt("WORLD_SIZE", 1)
	port := os.Getenv("MASTER_PORT")
	if port == "" {
		port = "29500"
	}
	return rank, world, os.Getenv("MASTER_ADDR"), port
}

func checksum(path string) string {
	h := sha256.New()
	if path == "" {
		log.Printf("no DATA_FILE; using the checksum of no data")
		return hex.EncodeToString(h.Sum(nil))
	}
	f, err := os.Open(path)
	if err != nil {
		fail(4, "DATA_FILE: %v", err)
	}
	defer f.Close()
	n, err := io.Copy(h, f)
	if err != nil {
		fail(4, "reading DATA_FILE %s: %v", path, err)
	}
	sum := hex.EncodeToString(h.Sum(nil))
	log.Printf("data file %s: %d bytes sha256=%s", path, n, sum)
	return sum
}

func resolve(ctx context.Context, host string) []string {
	for {
		addrs, err := net.DefaultResolver.LookupHost(ctx, host)
		if err == nil && len(addrs) > 0 {
			return addrs
		}
		select {
		case <-ctx.Done():
			fail(2, "resolving MASTER_ADDR %s: %v", host, err)
		case <-time.After(time.Second):
			log.Printf("resolving %s: %v (retrying)", host, err)
		}
	}
}

func main() {
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	rank, world, master, port := rendezvous()
	timeout := envDur("TIMEOUT", 120*time.Second)
	exitCode := envInt("EXIT_CODE", 0)
	host, _ := os.Hostname()
	log.Printf("trainer rank=%d world=%d master=%s:%s host=%s job=%s", rank, world, master, port, host, os.Getenv("KEELSON_JOB_NAME"))
	if rank < 0 || rank >= world {
		fail(1, "rank %d outside world size %d", rank, world)
	}
	sum := checksum(os.Getenv("DATA_FILE"))
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()

	if world > 1 {
		if master == "" {
			fail(1, "MASTER_ADDR is not set")
		}
		addrs := resolve(ctx, master)
		log.Printf("MASTER_ADDR %s resolves to %s", master, strings.Join(addrs, ","))
		if rank == 0 {
			serve(ctx, port, world, sum)
		} else {
			join(ctx, net.JoinHostPort(master, port), rank, sum)
		}
	}
	if hold := envDur("HOLD", 0); hold > 0 {
		log.Printf("holding %s", hold)
		time.Sleep(hold)
	}
	log.Printf("rank %d done; exiting %d", rank, exitCode)
	os.Exit(exitCode)
}

func serve(ctx context.Context, port string, world int, sum string) {
	ln, err := net.Listen("tcp", ":"+port)
	if err != nil {
		fail(1, "listen :%s: %v", port, err)
	}
	defer ln.Close()
	if dl, ok := ctx.Deadline(); ok {
		ln.(*net.TCPListener).SetDeadline(dl)
	}
	seen := map[int]bool{}
	for len(seen) < world-1 {
		c, err := ln.Accept()
		if err != nil {
			fail(2, "rank 0 saw %d of %d peers before the deadline: %v", len(seen), world-1, err)
		}
		c.SetDeadline(time.Now().Add(30 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		var r int
		var peerSum string
		if err == nil {
			_, err = fmt.Sscanf(strings.TrimSpace(line), "rank=%d sha256=%s", &r, &peerSum)
		}
		if err != nil {
			log.Printf("bad hello from %s: %q (%v)", c.RemoteAddr(), line, err)
			c.Close()
			continue
		}
		fmt.Fprintf(c, "sha256=%s\n", sum)
		c.Close()
		log.Printf("rank %d joined from %s sha256=%s", r, c.RemoteAddr(), peerSum)
		if peerSum != sum {
			fail(3, "rank %d has different data: %s != %s", r, peerSum, sum)
		}
		seen[r] = true
	}
	log.Printf("all %d peers joined with the same data", world-1)
}

func join(ctx context.Context, addr string, rank int, sum string) {
	// Each attempt resolves MASTER_ADDR again and gives up after a few seconds: a re-created rank 0
	// has a new IP, and a dial to the old one would otherwise wait for the whole TIMEOUT.
	d := net.Dialer{Timeout: 3 * time.Second}
	for {
		c, err := d.DialContext(ctx, "tcp", addr)
		if err == nil {
			c.SetDeadline(time.Now().Add(30 * time.Second))
			fmt.Fprintf(c, "rank=%d sha256=%s\n", rank, sum)
			line, err := bufio.NewReader(c).ReadString('\n')
			c.Close()
			if err == nil {
				master := strings.TrimPrefix(strings.TrimSpace(line), "sha256=")
				if master != sum {
					fail(3, "rank 0 has different data: %s != %s", master, sum)
				}
				log.Printf("joined rank 0 at %s; same data", addr)
				return
			}
			log.Printf("talking to %s: %v (retrying)", addr, err)
		}
		select {
		case <-ctx.Done():
			fail(2, "could not join rank 0 at %s before the deadline: %v", addr, err)
		case <-time.After(time.Second):
		}
	}
}
