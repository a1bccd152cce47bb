// Command modelserver is a stand-in model server for ModelDeployment tests on
// the real node. Every request is answered with the variant name and what the
// server finds under MODEL_PATH, so a test can tell which variant (and which
// model version) served it.
//
// Environment:
//
//	PORT          listen port (default 8080)
//	VARIANT       variant name reported in every answer (default "default")
//	MODEL_PATH    directory (or file) whose files are listed with sha256
//	LATENCY       added to every answer, a Go duration such as 50ms (default 0)
//	FAILURE_RATE  share of answers that are HTTP 500, 0.0..1.0 (default 0)
//	READY_DELAY   readiness stays 503 this long after start (default 0)
//	SHUTDOWN_DELAY on SIGTERM keep serving this long before draining (default 0)
//
// Health endpoints (never delayed or failed): /healthz (liveness), /ready,
// /readyz and /v2/health/ready (readiness). On SIGTERM readiness turns 503,
// in-flight requests finish, and the process exits 0.
//
// `modelserver fetch URL...` is a small HTTP client for tests inside the
// cluster (the image has no shell or curl): it GETs each URL, prints the
// status and body, and exits 1 on an error or a status >= 400. For https it
// trusts the service-account CA and sends the service-account token when the
// pod has them, so `fetch https://kubernetes.default.svc/version` checks the
// API server through the kubernetes Service.
package main

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log"
	"math/rand"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

type modelFile struct {
	Name   string `json:"name"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
}

type answer struct {
	Variant  string      `json:"variant"`
	Hostname string      `json:"hostname"`
	Path     string      `json:"path"`
	Method   string      `json:"method"`
	Model    modelReport `json:"model"`
	Served   int64       `json:"served"`
}

type modelReport struct {
	Path  string      `json:"path"`
	Files []modelFile `json:"files"`
	Error string      `json:"error,omitempty"`
}

const maxFiles = 100

func scanModel(root string) modelReport {
	rep := modelReport{Path: root, Files: []modelFile{}}
	if root == "" {
		rep.Error = "MODEL_PATH is not set"
		return rep
	}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		// Kubernetes' atomic writer (configMap, secret, projected volumes)
		// keeps the real files in a hidden ..<timestamp> dir behind symlinks.
		if strings.HasPrefix(d.Name(), "..") {
			if d.IsDir() {
				return fs.SkipDir
			}
			return nil
		}
		if d.IsDir() || len(rep.Files) >= maxFiles {
			return nil
		}
		if d.Type()&fs.ModeSymlink != 0 {
			if fi, err := os.Stat(p); err != nil || fi.IsDir() {
				return nil
			}
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		h := sha256.New()
		n, err := io.Copy(h, f)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if rel == "." {
			rel = filepath.Base(p)
		}
		rep.Files = append(rep.Files, modelFile{Name: rel, Size: n, SHA256: hex.EncodeToString(h.Sum(nil))})
		return nil
	})
	if err != nil {
		rep.Error = err.Error()
	}
	sort.Slice(rep.Files, func(i, j int) bool { return rep.Files[i].Name < rep.Files[j].Name })
	return rep
}

func envDuration(name string) time.Duration {
	v := os.Getenv(name)
	if v == "" {
		return 0
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		if ms, err2 := strconv.Atoi(v); err2 == nil {
			return time.Duration(ms) * time.Millisecond
		}
		log.Fatalf("%s=%q: %v", name, v, err)
	}
	return d
}

const saDir = "/var/run/secrets/kubernetes.io/serviceaccount"

func fetch(urls []string) {
	tlsConf := &tls.Config{}
	if pem, err := os.ReadFile(saDir + "/ca.crt"); err == nil {
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(pem)
		tlsConf.RootCAs = pool
	}
	token, _ := os.ReadFile(saDir + "/token")
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: tlsConf}}
	code := 0
	for _, u := range urls {
		req, err := http.NewRequest(http.MethodGet, u, nil)
		if err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", u, err)
			os.Exit(2)
		}
		if strings.HasPrefix(u, "https://") && len(token) > 0 {
			req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
		}
		resp, err := client.Do(req)
		if err != nil {
			fmt.Printf("%s: error: %v\n", u, err)
			code = 1
			continue
		}
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		resp.Body.Close()
		fmt.Printf("%s: %d\n%s\n", u, resp.StatusCode, strings.TrimSpace(string(body)))
		if resp.StatusCode >= 400 {
			code = 1
		}
	}
	os.Exit(code)
}

func main() {
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	if len(os.Args) > 1 && os.Args[1] == "fetch" {
		fetch(os.Args[2:])
	}
	port := os.Getenv("PORT")
	if port == "" {
		port = "8080"
	}
	variant := os.Getenv("VARIANT")
	if variant == "" {
		variant = "default"
	}
	modelPath := os.Getenv("MODEL_PATH")
	latency := envDuration("LATENCY")
	readyDelay := envDuration("READY_DELAY")
	shutdownDelay := envDuration("SHUTDOWN_DELAY")
	failureRate := 0.0
	if v := os.Getenv("FAILURE_RATE"); v != "" {
		f, err := strconv.ParseFloat(v, 64)
		if err != nil || f < 0 || f > 1 {
			log.Fatalf("FAILURE_RATE=%q: want a number in 0..1", v)
		}
		failureRate = f
	}
	host, _ := os.Hostname()
	start := time.Now()
	var served atomic.Int64
	var draining atomic.Bool
	model := scanModel(modelPath)
	log.Printf("modelserver variant=%s port=%s model=%s files=%d latency=%s failure_rate=%g",
		variant, port, modelPath, len(model.Files), latency, failureRate)

	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok\n") })
	ready := func(w http.ResponseWriter, r *http.Request) {
		if draining.Load() || time.Since(start) < readyDelay {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, "ready\n")
	}
	mux.HandleFunc("/ready", ready)
	mux.HandleFunc("/readyz", ready)
	mux.HandleFunc("/v2/health/ready", ready)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		if latency > 0 {
			time.Sleep(latency)
		}
		n := served.Add(1)
		w.Header().Set("X-Variant", variant)
		if failureRate > 0 && rand.Float64() < failureRate {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusInternalServerError)
			json.NewEncoder(w).Encode(map[string]string{"variant": variant, "error": "injected failure"})
			return
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(answer{
			Variant: variant, Hostname: host, Path: r.URL.Path, Method: r.Method,
			Model: scanModel(modelPath), Served: n,
		})
	})

	srv := &http.Server{Addr: ":" + port, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.ListenAndServe() }()
	sigc := make(chan os.Signal, 1)
	signal.Notify(sigc, syscall.SIGTERM, syscall.SIGINT)
	select {
	case err := <-errc:
		log.Fatalf("listen: %v", err)
	case s := <-sigc:
		log.Printf("%s: readiness off, draining after %s", s, shutdownDelay)
		draining.Store(true)
		time.Sleep(shutdownDelay)
		ctx, cancel := context.WithTimeout(context.Background(), 25*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Printf("shutdown: %v", err)
			os.Exit(1)
		}
		log.Printf("served %d requests; bye", served.Load())
	}
}
