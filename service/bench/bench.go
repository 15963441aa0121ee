// Package bench measures an exposed service against a direct connection
// to its target, and against what a user would set up instead (an ssh -L
// port forward), in one run ('onebox bench expose'): it starts a 2-node
// cluster on loopback, a TCP test server standing for the program on n2,
// exposes it through a port of n1 and times the same workloads on every
// path: bulk upload and download, request round trips on one connection,
// and new connections (connect plus one round trip).
package bench

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sort"
	"strconv"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/onebox-project/onebox/fabric/api"
	"github.com/onebox-project/onebox/service"
	"github.com/onebox-project/onebox/testbed"
)

// Defaults of the workloads.
const (
	DefaultSize     = 256 << 20 // bytes moved each way
	DefaultRequests = 2000      // round trips on one connection
	DefaultConnects = 200       // new connections
	requestSize     = 64        // bytes of one request and of its answer
	chunk           = 256 << 10
	opTimeout       = 60 * time.Second // any one workload on one path
)

// Path names, in the order they are measured.
const (
	Direct  = "direct"  // to the server's port
	Exposed = "exposed" // through n1's service address, carried to n2
	SSH     = "ssh -L"  // through an ssh port forward on loopback
)

// Options of a run.
type Options struct {
	Size     int64
	Requests int
	Connects int
	Binary   string    // onebox executable for the agents; default: this one
	NoSSH    bool      // skip the ssh -L comparison
	Log      io.Writer // progress; may be nil
}

// Measure is one path's figures.
type Measure struct {
	Path        string  `json:"path"` // direct or exposed
	UploadMBs   float64 `json:"upload_mb_s"`
	DownloadMBs float64 `json:"download_mb_s"`
	RTTp50us    float64 `json:"rtt_p50_us"`
	RTTp99us    float64 `json:"rtt_p99_us"`
	Connp50us   float64 `json:"connect_p50_us"`
	Connp99us   float64 `json:"connect_p99_us"`
}

// Result of a run.
type Result struct {
	Size     int64     `json:"size_bytes"`
	Requests int       `json:"requests"`
	Connects int       `json:"connects"`
	Measures []Measure `json:"measures"`
}

// Run starts the cluster, measures both paths and removes everything.
func Run(ctx context.Context, o Options) (*Result, error) {
	if o.Size <= 0 {
		o.Size = DefaultSize
	}
	if o.Requests <= 0 {
		o.Requests = DefaultRequests
	}
	if o.Connects <= 0 {
		o.Connects = DefaultConnects
	}
	logf := func(f string, a ...any) {
		if o.Log != nil {
			fmt.Fprintf(o.Log, "bench: "+f+"\n", a...)
		}
	}
	srv, err := startServer()
	if err != nil {
		return nil, err
	}
	defer srv.Close()
	logf("starting a 2-node cluster on loopback")
	cl, err := testbed.Start(ctx, testbed.Options{Nodes: 2, Binary: o.Binary, Logf: func(f string, a ...any) { logf(f, a...) }})
	if err != nil {
		return nil, err
	}
	defer cl.Close()
	port, err := testbed.FreePort()
	if err != nil {
		return nil, err
	}
	target := srv.Addr().(*net.TCPAddr).Port
	st, err := Expose(ctx, cl.Client(cl.Nodes[0]), service.ExposeRequest{
		Name: "bench", Node: cl.Nodes[0].Name, Port: port, Targets: []string{cl.Nodes[1].Name + ":" + strconv.Itoa(target)}})
	if err != nil {
		return nil, err
	}
	logf("exposed %s on %s -> %s:%d", st.Name, st.Address, cl.Nodes[1].Name, target)
	if err := WaitHealthy(ctx, cl.Client(cl.Nodes[0]), "bench", 1, 15*time.Second); err != nil {
		return nil, err
	}
	paths := []struct{ name, addr string }{
		{Direct, srv.Addr().String()},
		{Exposed, st.Address},
	}
	if !o.NoSSH {
		tun, err := startSSHTunnel(ctx, target)
		if err != nil {
			return nil, fmt.Errorf("bench: %w", err)
		}
		defer tun.Close()
		logf("ssh -L %s:127.0.0.1:%d through a private sshd on 127.0.0.1", tun.Addr, target)
		paths = append(paths, struct{ name, addr string }{SSH, tun.Addr})
	}
	r := &Result{Size: o.Size, Requests: o.Requests, Connects: o.Connects}
	for _, p := range paths {
		logf("measuring %s (%s)", p.name, p.addr)
		m, err := measure(ctx, p.addr, o)
		m.Path = p.name
		if err != nil {
			return r, fmt.Errorf("bench: %s path: %w", p.name, err)
		}
		r.Measures = append(r.Measures, m)
	}
	return r, nil
}

func measure(ctx context.Context, addr string, o Options) (Measure, error) {
	var m Measure
	var err error
	if m.UploadMBs, err = upload(ctx, addr, o.Size); err != nil {
		return m, fmt.Errorf("upload: %w", err)
	}
	if m.DownloadMBs, err = download(ctx, addr, o.Size); err != nil {
		return m, fmt.Errorf("download: %w", err)
	}
	rtt, err := roundTrips(ctx, addr, o.Requests)
	if err != nil {
		return m, fmt.Errorf("round trips: %w", err)
	}
	m.RTTp50us, m.RTTp99us = pct(rtt, 50), pct(rtt, 99)
	conn, err := connects(ctx, addr, o.Connects)
	if err != nil {
		return m, fmt.Errorf("connects: %w", err)
	}
	m.Connp50us, m.Connp99us = pct(conn, 50), pct(conn, 99)
	return m, nil
}

func dial(ctx context.Context, addr string, mode byte) (*net.TCPConn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	tc := c.(*net.TCPConn)
	tc.SetDeadline(time.Now().Add(opTimeout))
	if _, err := tc.Write([]byte{mode}); err != nil {
		tc.Close()
		return nil, err
	}
	return tc, nil
}

func mbs(n int64, d time.Duration) float64 { return float64(n) / 1e6 / d.Seconds() }

// upload sends size bytes to the sink, which answers with the count
// received once the client has shut its write side.
func upload(ctx context.Context, addr string, size int64) (float64, error) {
	start := time.Now()
	c, err := dial(ctx, addr, 'S')
	if err != nil {
		return 0, err
	}
	defer c.Close()
	buf := make([]byte, chunk)
	for left := size; left > 0; {
		n := min(left, int64(len(buf)))
		if _, err := c.Write(buf[:n]); err != nil {
			return 0, err
		}
		left -= n
	}
	c.CloseWrite()
	var got [8]byte
	if _, err := io.ReadFull(c, got[:]); err != nil {
		return 0, err
	}
	if n := int64(binary.BigEndian.Uint64(got[:])); n != size {
		return 0, fmt.Errorf("sink received %d bytes, sent %d", n, size)
	}
	return mbs(size, time.Since(start)), nil
}

// download asks the server for size bytes and reads them to the end.
func download(ctx context.Context, addr string, size int64) (float64, error) {
	start := time.Now()
	c, err := dial(ctx, addr, 'G')
	if err != nil {
		return 0, err
	}
	defer c.Close()
	if _, err := c.Write(binary.BigEndian.AppendUint64(nil, uint64(size))); err != nil {
		return 0, err
	}
	n, err := io.CopyBuffer(io.Discard, c, make([]byte, chunk))
	if err != nil {
		return 0, err
	}
	if n != size {
		return 0, fmt.Errorf("received %d bytes, asked for %d", n, size)
	}
	return mbs(size, time.Since(start)), nil
}

// roundTrips times n request/answer exchanges of requestSize bytes on one
// connection.
func roundTrips(ctx context.Context, addr string, n int) ([]time.Duration, error) {
	c, err := dial(ctx, addr, 'E')
	if err != nil {
		return nil, err
	}
	defer c.Close()
	req, resp := bytes.Repeat([]byte{'x'}, requestSize), make([]byte, requestSize)
	out := make([]time.Duration, 0, n)
	for range n {
		t := time.Now()
		if _, err := c.Write(req); err != nil {
			return nil, err
		}
		if _, err := io.ReadFull(c, resp); err != nil {
			return nil, err
		}
		out = append(out, time.Since(t))
	}
	return out, nil
}

// connects times n new connections, each until its first answer.
func connects(ctx context.Context, addr string, n int) ([]time.Duration, error) {
	out := make([]time.Duration, 0, n)
	req, resp := bytes.Repeat([]byte{'x'}, requestSize), make([]byte, requestSize)
	for range n {
		t := time.Now()
		c, err := dial(ctx, addr, 'E')
		if err != nil {
			return nil, err
		}
		_, err = c.Write(req)
		if err == nil {
			_, err = io.ReadFull(c, resp)
		}
		c.Close()
		if err != nil {
			return nil, err
		}
		out = append(out, time.Since(t))
	}
	return out, nil
}

func pct(ds []time.Duration, p int) float64 {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := (len(s)*p + 99) / 100
	i = min(max(i-1, 0), len(s)-1)
	return float64(s[i].Nanoseconds()) / 1e3
}

// server is the test program: the first byte of a connection selects
// E (echo), S (sink: count bytes to EOF, answer the count) or G
// (generate: read a count, send that many bytes, close).
type server struct {
	net.Listener
	wg sync.WaitGroup
}

func startServer() (*server, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &server{Listener: ln}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go serveConn(c)
		}
	}()
	return s, nil
}

func (s *server) Close() error {
	err := s.Listener.Close()
	s.wg.Wait()
	return err
}

func serveConn(c net.Conn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * opTimeout))
	var mode [1]byte
	if _, err := io.ReadFull(c, mode[:]); err != nil {
		return
	}
	switch mode[0] {
	case 'E':
		io.CopyBuffer(c, c, make([]byte, 4096))
	case 'S':
		n, err := io.CopyBuffer(io.Discard, c, make([]byte, chunk))
		if err == nil {
			c.Write(binary.BigEndian.AppendUint64(nil, uint64(n)))
		}
	case 'G':
		var nb [8]byte
		if _, err := io.ReadFull(c, nb[:]); err != nil {
			return
		}
		buf := make([]byte, chunk)
		for left := int64(binary.BigEndian.Uint64(nb[:])); left > 0; {
			n := min(left, int64(len(buf)))
			if _, err := c.Write(buf[:n]); err != nil {
				return
			}
			left -= n
		}
	}
}

// Expose asks an agent (through its API client) to expose a service.
func Expose(ctx context.Context, cl *api.Client, req service.ExposeRequest) (service.Status, error) {
	var st service.Status
	b, _ := json.Marshal(req)
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://agent/v1/services", bytes.NewReader(b))
	if err != nil {
		return st, err
	}
	resp, err := cl.HTTPClient().Do(hr)
	if err != nil {
		return st, err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode/100 != 2 {
		var eb api.ErrorBody
		if json.Unmarshal(body, &eb) == nil && eb.Error != "" {
			return st, errors.New(eb.Error)
		}
		return st, fmt.Errorf("expose: HTTP %d", resp.StatusCode)
	}
	return st, json.Unmarshal(body, &st)
}

// WaitHealthy waits until the service has at least want healthy targets
// that passed an active check.
func WaitHealthy(ctx context.Context, cl *api.Client, name string, want int, timeout time.Duration) error {
	return testbed.WaitFor(ctx, timeout, "service "+name+" to have "+strconv.Itoa(want)+" checked healthy targets", func(ctx context.Context) (bool, error) {
		var l service.List
		if err := cl.Get(ctx, "/v1/services?scope=node", &l); err != nil {
			return false, err
		}
		st, ok := l.Find(name)
		if !ok {
			return false, fmt.Errorf("no service %s", name)
		}
		n := 0
		for _, t := range st.State {
			if t.Healthy && t.Checks > 0 && t.LastError == "" {
				n++
			}
		}
		return n >= want, nil
	})
}

func (r *Result) measure(name string) *Measure {
	for i := range r.Measures {
		if r.Measures[i].Path == name {
			return &r.Measures[i]
		}
	}
	return nil
}

// PrintTable prints the measures and the ratios of the exposed path to
// the others.
func PrintTable(w io.Writer, r *Result) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "path\tupload\tdownload\trtt p50\trtt p99\tconnect p50\tconnect p99\n")
	for _, m := range r.Measures {
		fmt.Fprintf(tw, "%s\t%.0f MB/s\t%.0f MB/s\t%.0f us\t%.0f us\t%.0f us\t%.0f us\n", m.Path, m.UploadMBs, m.DownloadMBs, m.RTTp50us, m.RTTp99us, m.Connp50us, m.Connp99us)
	}
	ratio := func(a, b float64) string {
		if b == 0 {
			return "-"
		}
		return fmt.Sprintf("%.2fx", a/b)
	}
	e := r.measure(Exposed)
	for _, base := range []string{Direct, SSH} {
		d := r.measure(base)
		if e == nil || d == nil {
			continue
		}
		fmt.Fprintf(tw, "exposed/%s\t%s\t%s\t%s\t%s\t%s\t%s\n", base, ratio(e.UploadMBs, d.UploadMBs), ratio(e.DownloadMBs, d.DownloadMBs),
			ratio(e.RTTp50us, d.RTTp50us), ratio(e.RTTp99us, d.RTTp99us), ratio(e.Connp50us, d.Connp50us), ratio(e.Connp99us, d.Connp99us))
	}
	tw.Flush()
	fmt.Fprintf(w, "(%s each way; %d round trips of %d bytes on one connection; %d new connections, each until its first answer;\n"+
		" MB/s = 10^6 bytes/s; for times, lower is better; paths measured one after the other in one run, all on this machine's CPUs)\n",
		sizeText(r.Size), r.Requests, requestSize, r.Connects)
}

func sizeText(n int64) string {
	if n%(1<<20) == 0 {
		return strconv.FormatInt(n>>20, 10) + " MiB"
	}
	return strconv.FormatInt(n, 10) + " bytes"
}
