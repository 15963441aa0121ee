package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/onebox-project/onebox/agent"
	"github.com/onebox-project/onebox/fabric/api"
	"github.com/onebox-project/onebox/service"
	svcbench "github.com/onebox-project/onebox/service/bench"
	"github.com/onebox-project/onebox/testbed"
)

// serviceCommands are the services verbs (issue 5): expose, unexpose,
// services.
func serviceCommands() []*cobra.Command {
	return []*cobra.Command{newExposeCmd(), newUnexposeCmd(), newServicesCmd()}
}

// serviceBenchCommands are 'onebox bench' subcommands of services.
func serviceBenchCommands() []*cobra.Command { return []*cobra.Command{newBenchExposeCmd()} }

// serviceAgentFlags registers the agent's service flags on f (values in
// cfg) and returns a func that copies the flags the user set into final.
func serviceAgentFlags(f *pflag.FlagSet, cfg *agent.Config) func(final *agent.Config) {
	f.StringVar(&cfg.ServiceBind, "service-bind", "", "IP address exposed service ports listen on (default: --bind)")
	return func(final *agent.Config) {
		if f.Changed("service-bind") {
			final.ServiceBind = cfg.ServiceBind
		}
	}
}

// agentCall sends one request with a JSON body (none if body is nil) to
// the agent (unix socket or mutual TLS, as agentDial resolves it), bounded
// by timeout, and decodes the JSON answer into v; a non-2xx answer is an
// error carrying the agent's message.
func agentCall(cmd *cobra.Command, method, path string, timeout time.Duration, body, v any) error {
	dial, err := agentDial(cmd)
	if err != nil {
		return err
	}
	hc := &http.Client{Timeout: timeout, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) { return dial(ctx) },
	}}
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	ctx := cmd.Context()
	if ctx == nil {
		ctx = context.Background()
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://agent"+path, rd)
	if err != nil {
		return err
	}
	resp, err := hc.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("read the agent's answer: %w", err)
	}
	if resp.StatusCode/100 != 2 {
		var eb api.ErrorBody
		if json.Unmarshal(b, &eb) == nil && eb.Error != "" {
			return errors.New(eb.Error)
		}
		return fmt.Errorf("agent: HTTP %d", resp.StatusCode)
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("decode the agent's answer: %w", err)
	}
	return nil
}

func newExposeCmd() *cobra.Command {
	var req service.ExposeRequest
	c := &cobra.Command{
		Use:   "expose --node NODE --port PORT --to TARGET [--to TARGET...] [--name NAME]",
		Short: "Carry connections to a node's port over the fabric to listeners on other nodes",
		Long: `expose makes PORT of NODE a service address (OpenSSI's cluster virtual IP):
every connection to it is carried over the fabric, mutual TLS between agents,
to one of the targets, balanced across them. A target is NODE:PORT (a listener
on that node: its agent connects to 127.0.0.1:PORT, or its own address, never
to another host) or GID:PORT (a process from 'onebox ps', found again on each
new connection, so the service follows it when it moves).

Targets are checked every second through the fabric; one that fails 3 checks
in a row, or a dial, is taken out until it passes 2 checks. A connection whose
target fails is retried on another, so clients never wait on a dead target.

NODE listens on its service bind address (its --bind, or --service-bind);
'onebox services' shows where. Exposing again with the same --name adds
targets. Definitions are kept in NODE's data directory and survive its restart.
This can be run on any node: the local agent forwards it to NODE.`,
		Example: `  onebox expose --node n1 --port 8080 --to n2:8000 --to n3:8000 --name web
  onebox expose --name web --to n4:8000            # one more target
  onebox expose --node n1 --port 5432 --to g1a2b3c4d5e6f:5432 --policy least-conn`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			format, err := outputFormat(cmd)
			if err != nil {
				return err
			}
			if len(req.Targets) == 0 {
				return usagef("give at least one --to NODE:PORT or --to GID:PORT")
			}
			for _, t := range req.Targets {
				if _, err := service.ParseTarget(t); err != nil {
					return usagef("--to: %v", err)
				}
			}
			if req.Name == "" && (req.Node == "" || req.Port == 0) {
				return usagef("give --node and --port for a new service (or --name of an existing one to add targets)")
			}
			if req.Port != 0 {
				if _, err := service.ParsePort(strconv.Itoa(req.Port)); err != nil {
					return usagef("--port: %v", err)
				}
			}
			if req.Name != "" {
				if err := service.ValidName(req.Name); err != nil {
					return usagef("--name: %v", err)
				}
			}
			var st service.Status
			if err := agentCall(cmd, http.MethodPost, "/v1/services", 30*time.Second, req, &st); err != nil {
				return err
			}
			if format == "json" {
				return writeJSON(cmd.OutOrStdout(), st)
			}
			var ts []string
			for _, t := range st.Targets {
				ts = append(ts, t.String())
			}
			fmt.Fprintf(cmd.OutOrStdout(), "service %s: %s listens on %s -> %s (%s)\n", st.Name, st.Node, st.Address, strings.Join(ts, ", "), st.Policy)
			return nil
		},
	}
	f := c.Flags()
	f.StringVar(&req.Node, "node", "", "node whose port becomes the service address")
	f.IntVar(&req.Port, "port", 0, "port of that node")
	f.StringArrayVar(&req.Targets, "to", nil, "target NODE:PORT or GID:PORT (repeatable)")
	f.StringVar(&req.Name, "name", "", "service name (default NODE-PORT); an existing name adds targets")
	f.StringVar(&req.Policy, "policy", "", "round-robin (default) or least-conn")
	addOutputFlag(c)
	return c
}

func newUnexposeCmd() *cobra.Command {
	var target string
	c := &cobra.Command{
		Use:   "unexpose NAME [--to TARGET]",
		Short: "Remove a service address, or one of its targets",
		Long: `unexpose closes the service's port on its node, ends the connections it
carries and forgets its definition. With --to it removes only that target:
new connections no longer go there, those already carried go on. It can be
run on any node.`,
		Example: `  onebox unexpose web
  onebox unexpose web --to n3:8000`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) != 1 {
				return usagef("want exactly one service name ('onebox services' lists them), got %d arguments", len(args))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			path := "/v1/services/" + url.PathEscape(args[0])
			if target != "" {
				if _, err := service.ParseTarget(target); err != nil {
					return usagef("--to: %v", err)
				}
				path += "?" + url.Values{"target": {target}}.Encode()
			}
			var st service.Status
			if err := agentCall(cmd, http.MethodDelete, path, 30*time.Second, nil, &st); err != nil {
				return err
			}
			if target != "" {
				fmt.Fprintf(cmd.OutOrStdout(), "service %s: target %s removed (%d left)\n", st.Name, target, len(st.Targets))
				return nil
			}
			fmt.Fprintf(cmd.OutOrStdout(), "service %s removed from %s\n", st.Name, st.Address)
			return nil
		},
	}
	c.Flags().StringVar(&target, "to", "", "remove only this target (NODE:PORT or GID:PORT)")
	return c
}

func newServicesCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "services",
		Short: "List the cluster's service addresses, their targets and health",
		Long: `services lists every service address of the cluster: where it listens (the
socket the node listens on) and where clients reach it (the node's address
when it listens on all addresses), each target with its health and open and
total connections, and totals. It exits 1 if a live node did not answer.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			l, err := getAndPrint(cmd, "/v1/services", printServices)
			if err == nil && len(l.Unreachable) > 0 {
				var names []string
				for _, u := range l.Unreachable {
					names = append(names, u.Node+" ("+u.Error+")")
				}
				err = errors.New("services: no answer from " + strings.Join(names, ", "))
			}
			return err
		},
	}
	addOutputFlag(c)
	return c
}

func printServices(out io.Writer, l service.List) error {
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "NAME\tADDRESS\tLISTEN\tPOLICY\tTARGET\tON\tHEALTH\tACTIVE\tTOTAL\tFAILED")
	var targets, healthy int
	var active, total int64
	for _, s := range l.Services {
		listen := s.Node + " " + s.Listen
		if s.Error != "" {
			listen += " (" + s.Error + ")"
		}
		for i, t := range s.State {
			name, addr, lst, pol := s.Name, s.Address, listen, string(s.Policy)
			if i > 0 {
				name, addr, lst, pol = "", "", "", ""
			}
			health := "healthy"
			if !t.Healthy {
				health = "down"
				if t.LastError != "" {
					health += ": " + shorten(t.LastError, 60)
				}
			}
			on := t.Node
			if on == "" {
				on = "-"
			}
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%d\n", name, addr, lst, pol, t.Key, on, health, t.Active, t.Total, t.Failed)
			targets++
			if t.Healthy {
				healthy++
			}
		}
		active += s.Active
		total += s.Total
	}
	if err := w.Flush(); err != nil {
		return err
	}
	_, err := fmt.Fprintf(out, "%d services, %d targets (%d healthy), %d connections open, %d carried\n", len(l.Services), targets, healthy, active, total)
	return err
}

func shorten(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n-3] + "..."
}

func newBenchExposeCmd() *cobra.Command {
	size := agent.ByteSize(svcbench.DefaultSize)
	var requests, connects int
	var noSSH bool
	c := &cobra.Command{
		Use:   "expose",
		Short: "Measure throughput and latency through an exposed port against a direct connection and ssh -L",
		Long: `expose starts a 2-node cluster on loopback (as 'onebox dev --nodes 2' does), a
TCP test server standing for a program on n2, exposes it on a port of n1
('onebox expose --node n1 --port P --to n2:SERVER') and measures, on the
direct connection to the server, through the exposed port, and through what
a user would set up instead, an 'ssh -N -L' port forward to a private sshd on
127.0.0.1 (own port and keys in a temporary directory; the system's sshd
configuration and ~/.ssh are not used):

  upload     --size bytes sent to the server (it counts them and answers)
  download   --size bytes sent by the server
  rtt        --requests round trips of 64 bytes on one connection (p50, p99)
  connect    --connects new connections, each until its first answer (p50, p99)

and prints the ratios exposed/direct and exposed/ssh. Every wait is bounded;
the cluster, sshd and ssh are removed on every path out. Progress goes to
stderr.`,
		Example: `  onebox bench expose
  onebox bench expose --size 1GiB -o json
  onebox bench expose --no-ssh`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			format, err := outputFormat(cmd)
			if err != nil {
				return err
			}
			if size < 1<<20 || size > 64<<30 {
				return usagef("--size: %v is out of range (1MiB to 64GiB)", size)
			}
			if requests < 10 || requests > 1000000 || connects < 10 || connects > 100000 {
				return usagef("--requests (10 to 1000000) or --connects (10 to 100000) out of range")
			}
			if !noSSH {
				if err := svcbench.CheckSSH(); err != nil {
					return err
				}
			}
			start := time.Now()
			r, err := svcbench.Run(cmd.Context(), svcbench.Options{Size: int64(size), Requests: requests, Connects: connects, NoSSH: noSSH, Log: cmd.ErrOrStderr()})
			if r != nil && len(r.Measures) > 0 {
				if format == "json" {
					if werr := writeJSON(cmd.OutOrStdout(), r); werr != nil && err == nil {
						err = werr
					}
				} else {
					svcbench.PrintTable(cmd.OutOrStdout(), r)
				}
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "bench: finished in %v\n", time.Since(start).Round(time.Second))
			return err
		},
	}
	c.Flags().Var(&size, "size", "bytes moved each way (e.g. 256MiB, 1GiB)")
	c.Flags().IntVar(&requests, "requests", svcbench.DefaultRequests, "round trips on one connection")
	c.Flags().IntVar(&connects, "connects", svcbench.DefaultConnects, "new connections")
	c.Flags().BoolVar(&noSSH, "no-ssh", false, "skip the ssh -L comparison (no sshd or ssh needed)")
	addOutputFlag(c)
	return c
}

// demoService is the demo's services step: a tiny HTTP server runs on the
// last node (onebox run --detach), the first node exposes it on a port of
// its own by the server's global id, and a page is fetched through that
// port by a program on the first node.
func demoService(ctx context.Context, out io.Writer, cl *testbed.Cluster) error {
	from, on := cl.Nodes[0], cl.Nodes[len(cl.Nodes)-1]
	fmt.Fprintf(out, "\n==> Services: an HTTP server on %s, exposed on a port of %s, fetched through it\n", on.Name, from.Name)
	if _, err := exec.LookPath("python3"); err != nil {
		fmt.Fprintf(out, "    skipped: python3 is not installed (the demo's HTTP server)\n")
		return nil
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	site := filepath.Join(on.DataDir, "scratch", "site")
	if err := os.MkdirAll(site, 0o755); err != nil {
		return err
	}
	page := fmt.Sprintf("hello from the web server on %s\n", on.Name)
	if err := os.WriteFile(filepath.Join(site, "index.html"), []byte(page), 0o644); err != nil {
		return err
	}
	sport, err1 := testbed.FreePort()
	eport, err2 := testbed.FreePort()
	if err := errors.Join(err1, err2); err != nil {
		return err
	}
	onebox := func(node *testbed.Node, args ...string) (string, error) {
		cmd := exec.CommandContext(ctx, self, append([]string{"--agent", node.Agent()}, args...)...)
		b, err := cmd.CombinedOutput()
		if err != nil {
			return "", fmt.Errorf("onebox %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(b)))
		}
		return strings.TrimSpace(string(b)), nil
	}
	fmt.Fprintf(out, "    onebox run --detach --node %s -- python3 -m http.server %d --bind 127.0.0.1\n", on.Name, sport)
	gid, err := onebox(from, "run", "--detach", "--node", on.Name, "--", "python3", "-m", "http.server", strconv.Itoa(sport), "--bind", "127.0.0.1", "--directory", site)
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	defer onebox(from, "kill", gid)
	target := gid + ":" + strconv.Itoa(sport)
	fmt.Fprintf(out, "    onebox expose --node %s --port %d --to %s --name demo-web   (%s is the server's global id)\n", from.Name, eport, target, gid)
	msg, err := onebox(from, "expose", "--node", from.Name, "--port", strconv.Itoa(eport), "--to", target, "--name", "demo-web")
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	defer onebox(from, "unexpose", "demo-web")
	fmt.Fprintf(out, "    %s\n", msg)
	if err := svcbench.WaitHealthy(ctx, cl.Client(from), "demo-web", 1, 10*time.Second); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	var st service.Status
	var l service.List
	if err := cl.Client(from).Get(ctx, "/v1/services?scope=node", &l); err != nil {
		return err
	}
	st, _ = l.Find("demo-web")
	url := "http://" + st.Address + "/"
	fmt.Fprintf(out, "    onebox run --node %s -- python3 -c 'urlopen(\"%s\")'   (a client on %s)\n", from.Name, url, from.Name)
	got, err := onebox(from, "run", "--node", from.Name, "--", "python3", "-c",
		"import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())", url)
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	fmt.Fprintf(out, "    the page, carried %s -> fabric (mutual TLS) -> %s: %s\n", from.Name, on.Name, got)
	fmt.Fprintf(out, "    (server started, exposed, health-checked and fetched in %.1fs)\n", time.Since(start).Seconds())
	return nil
}
