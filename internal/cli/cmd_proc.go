package cli

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/onebox-project/onebox/agent"
	"github.com/onebox-project/onebox/fabric/api"
	"github.com/onebox-project/onebox/proc/manager"
	"github.com/onebox-project/onebox/proc/stream"
)

// ExitCodeError is returned by a command whose exit status is not one of
// the CLI's own (0, 1, 2) but a program's: 'onebox run' exits as the
// program did. Main returns Code without printing anything.
type ExitCodeError struct{ Code int }

func (e ExitCodeError) Error() string { return fmt.Sprintf("exit status %d", e.Code) }

// programEnv is the caller's environment minus what belongs to onebox on
// the caller's machine: the join token (a secret the program has no use
// for) and the address of the caller's local agent (meaningless on the
// program's node).
func programEnv(env []string) []string {
	out := make([]string, 0, len(env))
	for _, kv := range env {
		if strings.HasPrefix(kv, "ONEBOX_TOKEN=") || strings.HasPrefix(kv, "ONEBOX_AGENT=") {
			continue
		}
		out = append(out, kv)
	}
	return out
}

func exitWith(code int) error {
	if code == 0 {
		return nil
	}
	return ExitCodeError{Code: code}
}

// procCommands are the process-space verbs: run, ps, kill.
func procCommands() []*cobra.Command {
	return []*cobra.Command{newRunCmd(), newPsCmd(), newKillCmd()}
}

// forwarded are the signals 'onebox run' passes on to the program.
var forwarded = []os.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT, syscall.SIGUSR1, syscall.SIGUSR2}

func newRunCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "run [--node NAME | --best] [--detach] -- PROGRAM [ARGS...]",
		Short: "Run a program on a node of the cluster, its stdio and signals here",
		Long: `Run a program on a node of the cluster: this node's by default, the named one
with --node, or the alive node with the lowest load per CPU with --best.

stdin, stdout and stderr stream between this terminal and the program (through
the local agent, which relays to the target node's agent over mutual TLS);
SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 are forwarded to the
program's process group; onebox run exits with the program's status (128+N if
signal N killed it, as a shell reports). If this command goes away, the program
gets SIGHUP, as on a terminal hangup.

The program runs as the agent's user, in its own process group, with this
command's environment (all of it, passed along) and its working directory if
that exists on the target node (the same paths on every node), else /.

--detach prints the program's global id and returns; its output goes to a log
file on its node ('onebox ps -o json' says where).`,
		Args: cobra.MinimumNArgs(1),
		RunE: runRun,
	}
	c.Flags().SetInterspersed(false) // flags after PROGRAM are the program's
	c.Flags().String("node", "", "run on this node")
	c.Flags().Bool("best", false, "run on the alive node with the lowest load per CPU")
	c.Flags().Bool("detach", false, "run in the background: print the global id and return")
	c.Flags().Bool("no-balance", false, "with --best: the load balancer must not move the program later")
	c.Flags().Bool("memory-expand", false, "back the program's large allocations by the cluster memory pool")
	local := agent.ByteSize(0)
	c.Flags().Var(&local, "local-memory", "with --memory-expand: at most this much of them stays resident on the node (e.g. 2GiB; default: the node's)")
	return c
}

func runRun(cmd *cobra.Command, args []string) error {
	node, _ := cmd.Flags().GetString("node")
	best, _ := cmd.Flags().GetBool("best")
	detach, _ := cmd.Flags().GetBool("detach")
	if node != "" && best {
		return usagef("--node and --best exclude each other")
	}
	cwd, err := os.Getwd()
	if err != nil {
		cwd = "/"
	}
	noBalance, _ := cmd.Flags().GetBool("no-balance")
	if noBalance && !best {
		return usagef("--no-balance needs --best (only programs placed by --best are balanced)")
	}
	memExpand, _ := cmd.Flags().GetBool("memory-expand")
	var local uint64
	if f := cmd.Flags().Lookup("local-memory"); f != nil && f.Changed {
		if !memExpand {
			return usagef("--local-memory needs --memory-expand")
		}
		local = uint64(*f.Value.(*agent.ByteSize))
	}
	spec := stream.Spec{Argv: args, Env: programEnv(os.Environ()), Dir: cwd, Node: node, Best: best, Detach: detach,
		NoBalance: noBalance, MemoryExpand: memExpand, LocalMemory: local}
	if err := spec.Validate(); err != nil {
		return usagef("%v", err)
	}
	// Signals are ours from here on: forwarded to the program (one that
	// comes before it started is delivered when it starts; a second one
	// then ends this command, as 128+N).
	sigc := make(chan os.Signal, 16)
	signal.Notify(sigc, forwarded...)
	defer signal.Stop(sigc)

	parent := cmd.Context() // cancelled by SIGINT and SIGTERM (Main)
	if parent == nil {
		parent = context.Background()
	}
	ctx, cancel := context.WithTimeout(parent, 15*time.Second)
	conn, br, err := upgrade(ctx, cmd)
	cancel()
	if err != nil {
		return err
	}
	defer conn.Close()
	sc := stream.NewConn(conn, br)
	if err := sc.WriteJSON(stream.Start, spec); err != nil {
		return fmt.Errorf("send to the agent: %w", err)
	}
	// Bounded: the agent's own set-up steps are bounded (dial, start).
	_ = conn.SetReadDeadline(time.Now().Add(60 * time.Second))
	waiting, interrupted := make(chan struct{}), make(chan syscall.Signal, 1)
	watcher := make(chan struct{})
	go func() {
		defer close(watcher)
		for first := true; ; first = false {
			select {
			case s := <-sigc:
				n, _ := s.(syscall.Signal)
				if first {
					// Queued in the stream: the program gets it as soon
					// as it starts.
					_ = sc.Write(stream.Signal, []byte{byte(n)})
					continue
				}
				// A second one: give up waiting. The agent hangs up on
				// the program if it started.
				interrupted <- n
				conn.Close()
				return
			case <-waiting:
				return
			}
		}
	}()
	f, err := sc.Read()
	close(waiting)
	<-watcher
	_ = conn.SetReadDeadline(time.Time{})
	select {
	case n := <-interrupted:
		return exitWith(128 + int(n))
	default:
	}
	if err != nil {
		return fmt.Errorf("the agent did not answer: %w", err)
	}
	switch f.Type {
	case stream.Error:
		return errors.New(string(f.Payload))
	case stream.NotStarted:
		// As a shell: 127 for a program not found, 126 for one that
		// cannot be executed.
		var ns stream.NotStartedInfo
		if err := json.Unmarshal(f.Payload, &ns); err != nil || ns.Code < 1 || ns.Code > 255 {
			return fmt.Errorf("the agent's answer: bad not-started frame")
		}
		fmt.Fprintf(cmd.ErrOrStderr(), "onebox: %s\n", ns.Error)
		return ExitCodeError{Code: ns.Code}
	case stream.Started:
	default:
		return fmt.Errorf("the agent answered %s instead of started", f.Type)
	}
	if detach {
		var si stream.StartedInfo
		if err := json.Unmarshal(f.Payload, &si); err != nil {
			return fmt.Errorf("the agent's answer: %w", err)
		}
		fmt.Fprintln(cmd.OutOrStdout(), si.GID)
		return nil
	}

	done := make(chan struct{})
	defer close(done)
	go func() {
		for {
			select {
			case s := <-sigc:
				if n, ok := s.(syscall.Signal); ok {
					_ = sc.Write(stream.Signal, []byte{byte(n)})
				}
			case <-done:
				return
			}
		}
	}()
	// stdin: this goroutine may stay blocked in a read of the terminal
	// when the program ends; the process exits right after.
	go func() {
		buf := make([]byte, stream.ChunkSize)
		for {
			n, err := cmd.InOrStdin().Read(buf)
			if n > 0 {
				if sc.Write(stream.Stdin, buf[:n]) != nil {
					return
				}
			}
			if err != nil {
				_ = sc.Write(stream.StdinEOF, nil)
				return
			}
		}
	}()
	stdout, stderr := cmd.OutOrStdout(), cmd.ErrOrStderr()
	for {
		f, err := sc.Read()
		if err != nil {
			return fmt.Errorf("lost the connection to the agent: %w", err)
		}
		switch f.Type {
		case stream.Stdout:
			if _, err := stdout.Write(f.Payload); err != nil {
				return fmt.Errorf("write stdout: %w", err)
			}
		case stream.Stderr:
			if _, err := stderr.Write(f.Payload); err != nil {
				return fmt.Errorf("write stderr: %w", err)
			}
		case stream.Exit:
			st, _ := stream.DecodeExit(f.Payload) // checked by the decoder
			return exitWith(st.ShellCode())
		case stream.Error:
			return errors.New(string(f.Payload))
		default:
			return fmt.Errorf("the agent sent an unexpected %s frame", f.Type)
		}
	}
}

// agentDial resolves the agent address as clientFor does and returns a
// function that opens a connection to it (unix socket, or mutual TLS to
// an https address).
func agentDial(cmd *cobra.Command) (func(ctx context.Context) (net.Conn, error), error) {
	addr := agentAddress(cmd)
	wrap := func(err error) error {
		if errors.Is(err, syscall.EACCES) {
			return fmt.Errorf("cannot reach the onebox agent: %w (the agent's socket is for root only: run as root, e.g. with sudo)", err)
		}
		return fmt.Errorf("cannot reach the onebox agent: %w (is 'onebox agent' running? set --agent or ONEBOX_AGENT)", err)
	}
	switch {
	case strings.HasPrefix(addr, "unix://") && len(addr) > len("unix://"):
		path := strings.TrimPrefix(addr, "unix://")
		return func(ctx context.Context) (net.Conn, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, "unix", path)
			if err != nil {
				return nil, wrap(err)
			}
			return c, nil
		}, nil
	case strings.HasPrefix(addr, "https://"):
		u, err := url.Parse(addr)
		if err != nil || u.Host == "" {
			return nil, usagef("bad agent address %q", addr)
		}
		id, err := memberIdentity(cmd)
		if err != nil {
			return nil, err
		}
		d := tls.Dialer{Config: id.ClientTLS()}
		return func(ctx context.Context) (net.Conn, error) {
			c, err := d.DialContext(ctx, "tcp", u.Host)
			if err != nil {
				return nil, wrap(err)
			}
			return c, nil
		}, nil
	}
	return nil, usagef("agent address %q must start with unix:// or https://", addr)
}

// upgrade opens a stream to the agent: an HTTP request upgraded to
// stream.Upgrade. The returned reader holds bytes already read.
func upgrade(ctx context.Context, cmd *cobra.Command) (net.Conn, *bufio.Reader, error) {
	dial, err := agentDial(cmd)
	if err != nil {
		return nil, nil, err
	}
	conn, err := dial(ctx)
	if err != nil {
		return nil, nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	req, _ := http.NewRequest(http.MethodPost, "http://agent/v1/procs/run", nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", stream.Upgrade)
	if err := req.Write(conn); err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("talk to the agent: %w", err)
	}
	br := bufio.NewReaderSize(conn, 64<<10)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("the agent did not answer: %w", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
		resp.Body.Close()
		conn.Close()
		var eb api.ErrorBody
		if json.Unmarshal(body, &eb) == nil && eb.Error != "" {
			return nil, nil, fmt.Errorf("agent: %s", eb.Error)
		}
		return nil, nil, fmt.Errorf("the agent refused to run programs (HTTP %d): is it an older onebox?", resp.StatusCode)
	}
	_ = conn.SetDeadline(time.Time{})
	return conn, br, nil
}

func newPsCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "ps",
		Short: "List the onebox-managed processes of every node",
		Long: `List every process started with 'onebox run', on every node: global id, the
node it runs on, its home node (where 'onebox run' was issued), local pid,
state (running, exited N, killed SIGNAL), CPU%, resident memory, start time and
command. Exited processes stay listed for 10 minutes (at most 100 per node).
Nodes that cannot be asked are named, and the exit status is then 1.`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			l, err := getAndPrint(cmd, "/v1/procs", func(w io.Writer, l manager.ClusterList) error {
				printProcs(w, l)
				return nil
			})
			if err != nil {
				return err
			}
			if len(l.Unreachable) > 0 {
				var parts []string
				for _, u := range l.Unreachable {
					parts = append(parts, u.Node+": "+u.Error)
				}
				return fmt.Errorf("processes of %d node(s) not listed: %s", len(l.Unreachable), strings.Join(parts, "; "))
			}
			return nil
		},
	}
	addOutputFlag(c)
	return c
}

func printProcs(out io.Writer, l manager.ClusterList) {
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "GID\tNODE\tHOME\tPID\tSTATE\tCPU%\tRSS\tSTART\tCOMMAND\tNOTE")
	for _, p := range l.Procs {
		command := strings.Join(p.Command, " ")
		if len(command) > 60 {
			command = command[:57] + "..."
		}
		start := p.Started.Local().Format("15:04:05")
		if time.Since(p.Started) > 24*time.Hour {
			start = p.Started.Local().Format("Jan02")
		}
		rss := "-"
		if p.State == manager.StateRunning {
			rss = size(p.RSSBytes)
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%s\t%.1f\t%s\t%s\t%s\t%s\n", p.GID, p.Node, p.Home, p.PID, p.StateText(), p.CPUPercent, rss, start, command, p.Note)
	}
	w.Flush()
}

func newKillCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "kill [-SIGNAL | -s SIGNAL] GID",
		Short: "Send a signal (default TERM) to a process of the cluster, on whatever node it runs",
		Long: `Send a signal to the process group of a process started with 'onebox run', on
whatever node it runs: kill g0123456789ab, kill -9 GID, kill -INT GID,
kill -s USR1 GID. 'onebox ps' lists the global ids.`,
		// -9 and -TERM are not flags cobra could parse: the arguments are
		// taken apart here.
		DisableFlagParsing: true,
		Args:               cobra.ArbitraryArgs,
		RunE:               runKill,
	}
	c.Flags().StringP("signal", "s", "TERM", "signal name or number")
	return c
}

func runKill(cmd *cobra.Command, args []string) error {
	sig := ""
	if len(args) > 0 && len(args[0]) > 1 && args[0][0] == '-' && args[0][1] != '-' && args[0] != "-s" && args[0] != "-h" {
		if _, err := manager.ParseSignal(args[0][1:]); err == nil {
			sig, args = args[0][1:], args[1:]
		}
	}
	cmd.DisableFlagParsing = false
	if err := cmd.ParseFlags(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return cmd.Help()
		}
		return usageError{err}
	}
	if help, _ := cmd.Flags().GetBool("help"); help {
		return cmd.Help()
	}
	if cmd.Flags().Changed("signal") {
		if sig != "" {
			return usagef("give the signal once: -SIGNAL or -s SIGNAL")
		}
		sig, _ = cmd.Flags().GetString("signal")
	}
	if sig == "" {
		sig = "TERM"
	}
	s, err := manager.ParseSignal(sig)
	if err != nil {
		return usagef("%v", err)
	}
	rest := cmd.Flags().Args()
	if len(rest) != 1 {
		return usagef("want exactly one global id ('onebox ps' lists them), got %d arguments", len(rest))
	}
	gid := rest[0]
	q := url.Values{"signal": {manager.SignalName(s)}}
	return agentPost(cmd, "/v1/procs/"+url.PathEscape(gid)+"/signal?"+q.Encode(), 30*time.Second, nil)
}
