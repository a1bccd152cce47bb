// Command notebook is a stand-in Jupyter server for Notebook tests on the
// real node. It speaks the parts of Jupyter Server's HTTP API that the
// operator and its tests use, and refuses every request without the token.
//
// Token: env JUPYTER_TOKEN (what the operator sets from the <name>-token
// Secret) or an argument --ServerApp.token=T / --IdentityProvider.token=T /
// --NotebookApp.token=T. A request carries it as `Authorization: token T`
// or `?token=T`. It will not start without a token.
//
// Port: --port=N, else env PORT, else 8888. Workspace: --ServerApp.root_dir=D
// or --notebook-dir=D, else env NOTEBOOK_DIR, else $HOME, else /home/jovyan.
//
//	GET  /api                 {"version": ...}
//	GET  /api/status          {"started","last_activity","kernels","connections"}
//	GET  /api/kernels         list; POST starts a kernel; DELETE /api/kernels/<id>
//	PUT  /api/contents/<path> {"type":"file","format":"text","content":"..."} writes a file
//	                          under the workspace (POST does the same)
//	GET  /api/contents/<path> reads it back in the same shape
//	GET  /, /lab, /tree       a small HTML page
//
// Every authenticated request other than GET /api/status moves last_activity,
// as in Jupyter, so idle culling can be tested. NOTEBOOK_IDLE_SINCE=10m (a Go
// duration) starts last_activity that long before the server started, so a
// test can show culling with a CRD-valid timeout without waiting for it.
package main

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"
)

const jupyterTime = "2006-01-02T15:04:05.000000Z"

type server struct {
	token   string
	root    string
	started time.Time

	mu           sync.Mutex
	lastActivity time.Time
	kernels      map[string]time.Time
}

func (s *server) authorized(r *http.Request) bool {
	got := r.URL.Query().Get("token")
	if h := r.Header.Get("Authorization"); got == "" && h != "" {
		f := strings.Fields(h)
		if len(f) == 2 && strings.EqualFold(f[0], "token") {
			got = f[1]
		}
	}
	return got != "" && subtle.ConstantTimeCompare([]byte(got), []byte(s.token)) == 1
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

func jerr(w http.ResponseWriter, code int, msg string) {
	writeJSON(w, code, map[string]string{"message": msg, "reason": http.StatusText(code)})
}

func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !s.authorized(r) {
		log.Printf("%s %s -> 403 (no valid token)", r.Method, r.URL.Path)
		jerr(w, http.StatusForbidden, "Forbidden: a valid token is required")
		return
	}
	if !(r.Method == http.MethodGet && r.URL.Path == "/api/status") {
		s.mu.Lock()
		s.lastActivity = time.Now().UTC()
		s.mu.Unlock()
	}
	p := r.URL.Path
	switch {
	case p == "/api" || p == "/api/":
		writeJSON(w, 200, map[string]string{"version": "2.14.0-keelson-standin"})
	case p == "/api/status":
		s.mu.Lock()
		st := map[string]any{
			"started":       s.started.Format(jupyterTime),
			"last_activity": s.lastActivity.Format(jupyterTime),
			"kernels":       len(s.kernels),
			"connections":   0,
		}
		s.mu.Unlock()
		writeJSON(w, 200, st)
	case p == "/api/kernels" || strings.HasPrefix(p, "/api/kernels/"):
		s.kernelsAPI(w, r, strings.TrimPrefix(strings.TrimPrefix(p, "/api/kernels"), "/"))
	case p == "/api/contents" || strings.HasPrefix(p, "/api/contents/"):
		s.contents(w, r, strings.TrimPrefix(strings.TrimPrefix(p, "/api/contents"), "/"))
	case p == "/" || p == "/lab" || strings.HasPrefix(p, "/lab/") || p == "/tree" || strings.HasPrefix(p, "/tree/"):
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		fmt.Fprintf(w, "<!doctype html><title>JupyterLab</title><p>keelson notebook stand-in; workspace %s</p>\n", s.root)
	default:
		jerr(w, 404, "not found")
	}
}

func (s *server) kernelsAPI(w http.ResponseWriter, r *http.Request, id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case id == "" && r.Method == http.MethodGet:
		ids := make([]map[string]string, 0, len(s.kernels))
		for k, t := range s.kernels {
			ids = append(ids, map[string]string{"id": k, "name": "python3", "last_activity": t.Format(jupyterTime), "execution_state": "idle"})
		}
		sort.Slice(ids, func(i, j int) bool { return ids[i]["id"] < ids[j]["id"] })
		writeJSON(w, 200, ids)
	case id == "" && r.Method == http.MethodPost:
		b := make([]byte, 8)
		rand.Read(b)
		k := hex.EncodeToString(b)
		s.kernels[k] = time.Now().UTC()
		writeJSON(w, 201, map[string]string{"id": k, "name": "python3"})
	case id != "" && r.Method == http.MethodDelete:
		if _, ok := s.kernels[id]; !ok {
			jerr(w, 404, "no such kernel")
			return
		}
		delete(s.kernels, id)
		w.WriteHeader(204)
	default:
		jerr(w, 405, "method not allowed")
	}
}

// resolve maps an API path to a file under the workspace, refusing escapes.
func (s *server) resolve(rel string) (string, bool) {
	clean := filepath.Clean("/" + rel)
	full := filepath.Join(s.root, clean)
	return full, full == s.root || strings.HasPrefix(full, s.root+string(os.PathSeparator))
}

type contentModel struct {
	Name         string `json:"name"`
	Path         string `json:"path"`
	Type         string `json:"type"`
	Format       string `json:"format"`
	Content      any    `json:"content"`
	Size         int64  `json:"size"`
	LastModified string `json:"last_modified"`
}

func (s *server) contents(w http.ResponseWriter, r *http.Request, rel string) {
	full, ok := s.resolve(rel)
	if !ok {
		jerr(w, 400, "path escapes the workspace")
		return
	}
	switch r.Method {
	case http.MethodGet:
		fi, err := os.Stat(full)
		if err != nil {
			jerr(w, 404, err.Error())
			return
		}
		m := contentModel{Name: fi.Name(), Path: rel, Size: fi.Size(), LastModified: fi.ModTime().UTC().Format(jupyterTime)}
		if fi.IsDir() {
			ents, err := os.ReadDir(full)
			if err != nil {
				jerr(w, 500, err.Error())
				return
			}
			list := []map[string]string{}
			for _, e := range ents {
				t := "file"
				if e.IsDir() {
					t = "directory"
				}
				list = append(list, map[string]string{"name": e.Name(), "path": filepath.Join(rel, e.Name()), "type": t})
			}
			m.Type, m.Format, m.Content = "directory", "json", list
		} else {
			b, err := os.ReadFile(full)
			if err != nil {
				jerr(w, 500, err.Error())
				return
			}
			m.Type, m.Format, m.Content = "file", "text", string(b)
		}
		writeJSON(w, 200, m)
	case http.MethodPut, http.MethodPost:
		if rel == "" {
			jerr(w, 400, "a file path is required")
			return
		}
		body, err := io.ReadAll(io.LimitReader(r.Body, 64<<20))
		if err != nil {
			jerr(w, 400, err.Error())
			return
		}
		var in struct {
			Type    string `json:"type"`
			Format  string `json:"format"`
			Content string `json:"content"`
		}
		if err := json.Unmarshal(body, &in); err != nil {
			jerr(w, 400, "want {\"type\":\"file\",\"format\":\"text\",\"content\":...}: "+err.Error())
			return
		}
		if in.Type == "directory" {
			err = os.MkdirAll(full, 0o755)
		} else {
			if err = os.MkdirAll(filepath.Dir(full), 0o755); err == nil {
				err = os.WriteFile(full, []byte(in.Content), 0o644)
			}
		}
		if err != nil {
			jerr(w, 500, err.Error())
			return
		}
		fi, _ := os.Stat(full)
		log.Printf("wrote %s (%d bytes)", full, fi.Size())
		writeJSON(w, 201, contentModel{Name: fi.Name(), Path: rel, Type: map[bool]string{true: "directory", false: "file"}[fi.IsDir()],
			Format: "text", Size: fi.Size(), LastModified: fi.ModTime().UTC().Format(jupyterTime)})
	case http.MethodDelete:
		if err := os.RemoveAll(full); err != nil {
			jerr(w, 500, err.Error())
			return
		}
		w.WriteHeader(204)
	default:
		jerr(w, 405, "method not allowed")
	}
}

func main() {
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	token := os.Getenv("JUPYTER_TOKEN")
	port := os.Getenv("PORT")
	root := os.Getenv("NOTEBOOK_DIR")
	for _, a := range os.Args[1:] {
		k, v, _ := strings.Cut(strings.TrimLeft(a, "-"), "=")
		switch k {
		case "ServerApp.token", "IdentityProvider.token", "NotebookApp.token":
			token = v
		case "port", "ServerApp.port", "NotebookApp.port":
			port = v
		case "ServerApp.root_dir", "notebook-dir", "NotebookApp.notebook_dir":
			root = v
		}
	}
	if port == "" {
		port = "8888"
	}
	if root == "" {
		root = os.Getenv("HOME")
	}
	if root == "" || root == "/" {
		root = "/home/jovyan"
	}
	if token == "" {
		log.Fatal("no token: set JUPYTER_TOKEN or --ServerApp.token (a notebook never runs open)")
	}
	root, _ = filepath.Abs(root)
	if err := os.MkdirAll(root, 0o755); err != nil {
		log.Printf("warning: workspace %s: %v", root, err)
	}
	now := time.Now().UTC()
	last := now
	if v := os.Getenv("NOTEBOOK_IDLE_SINCE"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 {
			log.Fatalf("NOTEBOOK_IDLE_SINCE=%q: want a duration such as 10m", v)
		}
		last = now.Add(-d)
	}
	s := &server{token: token, root: root, started: now, lastActivity: last, kernels: map[string]time.Time{}}
	srv := &http.Server{Addr: ":" + port, Handler: s, ReadHeaderTimeout: 10 * time.Second}
	log.Printf("notebook stand-in on :%s, workspace %s", port, root)
	errc := make(chan error, 1)
	go func() { errc <- srv.ListenAndServe() }()
	sigc := make(chan os.Signal, 1)
	signal.Notify(sigc, syscall.SIGTERM, syscall.SIGINT)
	select {
	case err := <-errc:
		log.Fatalf("listen: %v", err)
	case sig := <-sigc:
		log.Printf("%s: shutting down", sig)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil && !errors.Is(err, http.ErrServerClosed) {
			os.Exit(1)
		}
	}
}
