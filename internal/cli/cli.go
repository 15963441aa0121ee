// Package cli implements the onebox command line: one verb per cobra
// command, read commands printing a table or JSON (-o json), exit status 0
// on success, 1 on failure and 2 on usage errors.
package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/onebox-project/onebox/fabric/api"
)

// Exit codes.
const (
	ExitOK      = 0
	ExitFailure = 1
	ExitUsage   = 2
)

// usageError marks errors that are the caller's wording, not a failure.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func usagef(format string, a ...any) error { return usageError{fmt.Errorf(format, a...)} }

// Main runs the CLI with args and returns the exit status.
func Main(args []string, stdout, stderr io.Writer) int {
	root := newRoot(stdout, stderr)
	root.SetArgs(args)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cmd, err := root.ExecuteContextC(ctx)
	if err == nil {
		return ExitOK
	}
	if ec := (ExitCodeError{}); errors.As(err, &ec) {
		return ec.Code // a program's status, passed through by 'onebox run'
	}
	fmt.Fprintf(stderr, "onebox: %v\n", err)
	var ue usageError
	// cobra reports an unknown verb before any of our code runs.
	if errors.As(err, &ue) || strings.HasPrefix(err.Error(), "unknown command") {
		if cmd != nil {
			fmt.Fprintf(stderr, "Run '%s --help' for usage.\n", cmd.CommandPath())
		}
		return ExitUsage
	}
	return ExitFailure
}

func newRoot(stdout, stderr io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:   "onebox",
		Short: "Make several Linux machines behave as one",
		Long: `onebox joins ordinary Linux machines into one large machine: one view of all
CPUs, memory, disks and NICs, secured by mutual TLS, surviving the loss of a node.

Start here:  onebox demo            (a local demo cluster, no set-up)
             onebox dev --nodes 3   (a local cluster to play with)
             onebox init            (create a real cluster on this machine)`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	root.PersistentFlags().String("agent", "", "agent address: unix:///path/agent.sock or https://host:port (default $ONEBOX_AGENT, else "+api.DefaultAgent+")")
	root.PersistentFlags().String("data-dir", "", "the agent's data directory (default /var/lib/onebox; for https agents, where the member certificate is)")
	root.AddCommand(newInitCmd(), newAgentCmd(), newNodesCmd(), newStatusCmd(), newDevCmd(), newDemoCmd(), newBenchCmd(), newVersionCmd())
	root.AddCommand(procCommands()...)
	root.AddCommand(cfsCommands()...)
	root.AddCommand(migrateCommands()...)
	root.AddCommand(balanceCommands()...)
	root.AddCommand(memCommands()...)
	root.AddCommand(serviceCommands()...)
	for _, c := range root.Commands() {
		wrapArgs(c)
	}
	return root
}

// wrapArgs makes positional-argument errors usage errors.
func wrapArgs(c *cobra.Command) {
	if c.Args == nil {
		c.Args = cobra.NoArgs
	}
	inner := c.Args
	c.Args = func(cmd *cobra.Command, args []string) error {
		if err := inner(cmd, args); err != nil {
			return usageError{err}
		}
		return nil
	}
}
