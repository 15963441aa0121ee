package cli

import "github.com/spf13/cobra"

// procCommands are the process-space verbs (run, ps, kill, migrate...).
func procCommands() []*cobra.Command { return nil }
