"""The sbatch templates `lmtrain submit` renders (string.Template, `$name` fields), shipped as
package data so that an installed lmtrain can submit jobs."""
